"""Draw the figures of run folders: loss and validation curves, labelled comparisons.

    python launch/report.py runs/demo                 # the demo's runs and its evaluation
    python launch/report.py runs/spsr_g --out figs/   # one training run
    python launch/report.py runs/eval --hr Set5=datasets/Set5/HR
"""

import sys

from spsr_hpc.report import main

if __name__ == "__main__":
    sys.exit(main())
