"""The README's main job: bundled photos -> shards -> PSNR stage -> SPSR-G -> evaluation report.

    python launch/demo.py [--out runs/demo] [--nproc 2]

(`bash scripts/demo.sh` sets up the virtual environment first and then runs this.)
"""

import sys

from spsr_hpc.demo import main

if __name__ == "__main__":
    sys.exit(main())
