"""Table-I-style evaluation (LPIPS / PSNR / SSIM on the paper's protocol). See docs/evaluation.md.

    python launch/evaluate.py --model SPSR=SPSR.pth --data-root datasets --sets Set5 Set14 --out runs/eval
    python launch/evaluate.py --model SPSR=SPSR.pth --model ESRGAN:rrdbnet=RRDB_ESRGAN_x4.pth
    torchrun --nproc_per_node 8 launch/evaluate.py --model SPSR=SPSR.pth --data-root datasets --precision bf16
    python launch/evaluate.py --bundled --out runs/eval_bundled   # bicubic on bundled photos, no download
"""

from spsr_hpc.evaluate import main

if __name__ == "__main__":
    main()
