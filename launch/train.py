"""Train an SR GAN. See spsr_hpc/train/trainer.py for the launch commands.

    deepspeed launch/train.py --config configs/spsr_g.yaml [key=value ...]
    torchrun --nproc_per_node 2 launch/train.py --config configs/spsr_g.yaml
    python launch/train.py --config configs/tiny_spsr_g.yaml
    python launch/train.py --config configs/spsr_g.yaml --validate
"""

import sys

from spsr_hpc.train.trainer import main

if __name__ == "__main__":
    sys.exit(main())
