"""`vidattn bench attention|model`: the benchmark scripts."""

from __future__ import annotations

import importlib.util
import os

from . import EXIT_USAGE, UsageError

__all__ = ["add_parser", "run"]


def add_parser(sub):
    p = sub.add_parser("bench", help="kernel and end-to-end benchmarks: vidattn bench attention|model [--help]")
    p.add_argument("which", choices=["attention", "model"], help="benchmarks/attention.py or benchmarks/model.py")
    return p


def _repo_root():
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return here if os.path.isdir(os.path.join(here, "benchmarks")) else None


def run(a) -> int:
    if a.which is None:
        raise UsageError("vidattn bench: choose attention or model (vidattn bench attention --help)")
    root = _repo_root()
    path = os.path.join(root, "benchmarks", f"{a.which}.py") if root else None
    if path is None or not os.path.isfile(path):
        raise UsageError(f"vidattn bench {a.which}: benchmarks/{a.which}.py not found (the benchmarks ship with the "
                         f"source repository, not the installed package; run from a git checkout)")
    spec = importlib.util.spec_from_file_location(f"vidattn_bench_{a.which}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "main"):
        raise UsageError(f"{path} has no main(argv)")
    try:
        return int(mod.main(a.rest) or 0)
    except SystemExit as e:  # argparse --help / errors inside the benchmark
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
