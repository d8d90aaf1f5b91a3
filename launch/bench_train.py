"""Training throughput benchmark (samples/s); see spsr_hpc/bench/train.py.

    python launch/bench_train.py                       # tiny SPSR-G on CPU, 1 and 2 processes
    python launch/bench_train.py --config configs/spsr_g.yaml --procs 1 perceptual.random_weights=true
"""

from spsr_hpc.bench.train import main

if __name__ == "__main__":
    main()
