"""NSE evaluation, the paper's protocol: frozen NSE, fresh heads fitted on the training shards,
contrastive top-1 (~2,000 negatives) and jigsaw accuracy on dense patches of held-out images,
10 repeats, against a random-init NSE; see spsr_hpc/nse/evaluate.py and docs/nse.md.

    python launch/evaluate_nse.py --nse runs/nse_contrastive/nse.safetensors \
        --nse runs/nse_jigsaw/nse.safetensors --train-shards data/div2k_shards \
        --heldout Set14=data/benchmark/Set14/HR --heldout BSD100=data/benchmark/BSD100/HR \
        --out runs/nse_eval
"""

import sys

from spsr_hpc.nse.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
