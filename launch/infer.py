"""Super-resolve an image or a folder with a generator checkpoint, in overlapping tiles.
See docs/evaluation.md.

    python launch/infer.py --input photo.png --checkpoint SPSR.pth --out runs/infer
    python launch/infer.py --input lr_dir/ --checkpoint SPSR.pth --tile 128 --precision bf16 --save-grad
    python launch/infer.py --checkpoint SPSR.pth --export-safetensors spsr.safetensors --onnx spsr.onnx
"""

from spsr_hpc.inference import main

if __name__ == "__main__":
    main()
