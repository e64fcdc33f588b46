"""End-to-end denoising-step benchmark on production shapes: a thin wrapper of
:mod:`vidattn.bench.model` (its docstring has the commands), kept so ``python benchmarks/model.py``
keeps working; ``vidattn bench model`` runs the same module."""

import sys

from vidattn.bench.model import *  # noqa: F401,F403  (the benchmark's names, for scripts importing this file)
from vidattn.bench.model import main

if __name__ == "__main__":
    sys.exit(main())
