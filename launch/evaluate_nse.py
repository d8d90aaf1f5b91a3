"""NSE evaluation: frozen NSE, fresh heads, held-out contrastive top-1 and jigsaw accuracy,
against a random-init NSE; see spsr_hpc/nse/evaluate.py.

    python launch/evaluate_nse.py --nse runs/nse_contrastive/nse.safetensors \
        --train-shards data/div2k_shards --heldout data/bsd100/HR --out runs/nse_eval.json
"""

import sys

from spsr_hpc.nse.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
