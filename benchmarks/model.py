"""(Thin wrapper of :mod:`vidattn.bench.model`.) End-to-end denoising-step benchmark on production shapes (random weights, real configs).

Builds a full-size diffusers transformer from its published config (Wan2.1-T2V-1.3B,
HunyuanVideo, FLUX.1-dev) with random weights directly on the GPU, runs one denoising-step forward
and reports ms/step for dense attention (SDPA cuDNN and flash, FlexAttention) and for each sparse
family at ~75% and ~90% sparsity, eager and optionally ``torch.compile``d / CUDA-graphed, with the
density achieved, the attention share of the step and peak memory. ``--breakdown`` profiles one
step per config (torch.profiler) and splits it into attention / linear (GEMM) / other kernels,
plus the sparse overhead outside the attention kernel (plan lookup, permutation gathers, pooling,
profiling).

    python benchmarks/model.py --model wan --json out.json [--compile NAMES] [--cuda-graphs NAMES]
    python benchmarks/model.py --model hunyuan [--frames 129 --height 720 --width 1280]
    python benchmarks/model.py --model flux [--height 1024 --width 1024]
    python benchmarks/model.py --tiny --model flux --breakdown --json out.json   # CPU, seconds
    vidattn bench model --model wan ...          # the same: this module, vidattn.bench.model

Full-size configs need a CUDA GPU; ``--tiny`` runs every model path on CPU with tiny configs.
Timing: :mod:`vidattn.bench.timing` (one CUDA-event/wall-clock timer for every benchmark); the
profiler split: :mod:`vidattn.bench.breakdown`.
"""

import sys

from vidattn.bench.model import *  # noqa: F401,F403  (the benchmark's names, for scripts importing this file)
from vidattn.bench.model import main

if __name__ == "__main__":
    sys.exit(main())
