"""NSE pretraining (contrastive prediction or jigsaw); see spsr_hpc/nse/pretrain.py.

    deepspeed --num_gpus 8 launch/pretrain_nse.py --config configs/nse_contrastive.yaml
    torchrun --nproc_per_node 2 launch/pretrain_nse.py --config configs/nse_jigsaw.yaml
    python launch/pretrain_nse.py --config configs/tiny_nse_contrastive.yaml train.max_steps=20
"""

import sys

from spsr_hpc.nse.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
