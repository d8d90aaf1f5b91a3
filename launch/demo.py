"""The README's main job: bundled photos -> shards -> PSNR stage -> ESRGAN, SPSR-G -> evaluation report.

    python launch/demo.py [--out runs/demo] [--nproc 2] [--precision fp32|bf16|auto]

(`bash scripts/demo.sh` sets up the virtual environment first and then runs this.) The demo
launches this same script under DeepSpeed (hidden option --run-stages) to train its stages.
"""

import sys

from spsr_hpc.demo import main

if __name__ == "__main__":
    sys.exit(main())
