"""Multi-GPU benchmark: one Wan2.1-14B-config (random weights) 720p / 81-frame transformer step under
diffusers context parallelism (Ulysses, Ring) at world sizes 2 / 4 / 8, dense vs vidattn sparse.

Reports per (mode, world size, pattern): median step time, scaling efficiency against the
single-GPU step (``t1 / (W * tW)``), peak memory per GPU, the output difference to the single-GPU
output, vidattn's call counts and (Ulysses) the head load-balance report.

GPU (the lead runs it; one H200 per rank):

    python benchmarks/parallel.py --world-sizes 1,2,4,8 --modes ulysses,ring \\
        --patterns dense,radial --json results_parallel.json

CPU smoke path (tiny config, gloo, 2 processes; what CI can run):

    python benchmarks/parallel.py --tiny --json /tmp/parallel.json

``vidattn bench parallel`` runs the same code: ``from vidattn.pipelines.parallel_bench import main``
(``main(argv) -> exit code``; the spawned worker is ``vidattn.context_parallel.bench_worker``).
"""

import sys

from vidattn.pipelines.parallel_bench import main

if __name__ == "__main__":
    sys.exit(main())
