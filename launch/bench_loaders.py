"""Loader throughput benchmark (see spsr_hpc/bench/loaders.py).

python launch/bench_loaders.py
"""

from spsr_hpc.bench.loaders import main

if __name__ == "__main__":
    main()
