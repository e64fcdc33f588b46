"""Multi-GPU benchmark: one Wan2.1-14B-config (random weights) 720p / 81-frame transformer step under
diffusers context parallelism (Ulysses, Ring) at world sizes 2 / 4 / 8, dense vs vidattn sparse.

Reports per (mode, world size, pattern): median step time, scaling efficiency against the
single-GPU step (``t1 / (W * tW)``), peak memory per GPU, the output difference to the single-GPU
output, vidattn's call counts and (Ulysses) the head load-balance report.

GPU (the lead runs it; one H200 per rank). A bare machine per kind, so each call runs its own
single-GPU baseline (world size 1 is always run unless --baseline-dir holds one):

    python benchmarks/parallel.py --world-sizes 1,2 --modes ulysses,ring --patterns dense,radial \
        --warmup 1 --reps 1 --json parallel_x2.json                                    # nvidia-h200-x2
    (x4: --world-sizes 1,4 ... --json parallel_x4.json; x8: --world-sizes 1,8 ... --json parallel_x8.json;
     a second call per kind with --patterns dense,neighborhood for the ~90%-sparse window)

CPU smoke path (tiny config, gloo, 2 processes; what CI can run):

    python benchmarks/parallel.py --tiny --json /tmp/parallel.json

``vidattn bench parallel`` runs the same code: ``from vidattn.pipelines.parallel_bench import main``
(``main(argv) -> exit code``; the spawned worker is ``vidattn.context_parallel.bench_worker``).
"""

import sys

from vidattn.pipelines.parallel_bench import main

if __name__ == "__main__":
    sys.exit(main())
