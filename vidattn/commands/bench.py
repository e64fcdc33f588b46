"""`vidattn bench [NAME] [...]`: list the benchmarks, or run one by module name.

The benchmarks are installed modules (:data:`vidattn.bench.BENCHMARKS`: ``vidattn.bench.*`` and
the repository's ``benchmarks/`` folder installed as ``vidattn.benchmarks``), imported on demand,
so ``vidattn bench`` works the same from a wheel and from a source checkout. Each module provides
``main(argv) -> int``; everything after ``vidattn bench NAME`` is passed to it.
"""

from __future__ import annotations

import importlib

from . import EXIT_USAGE, UsageError

__all__ = ["add_parser", "run", "load_benchmark"]


def _benchmarks():
    from vidattn.bench import BENCHMARKS

    return BENCHMARKS


def add_parser(sub):
    names = ", ".join(_benchmarks())
    p = sub.add_parser("bench", help=f"benchmarks: vidattn bench [{names.replace(', ', '|')}] [--help]",
                       description="With no NAME: list the benchmarks. vidattn bench NAME --help shows its options.")
    p.add_argument("which", nargs="?", choices=list(_benchmarks()), help=f"the benchmark to run ({names})")
    return p


def load_benchmark(name: str):
    """The module of benchmark ``name`` (imported by module name); :class:`UsageError` when it is
    unknown or not part of this installation."""
    table = _benchmarks()
    if name not in table:
        raise UsageError(f"vidattn bench: choose one of {', '.join(table)}, got {name!r}")
    modname = table[name][0]
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name and (modname == e.name or modname.startswith(e.name + ".")):
            raise UsageError(f"vidattn bench {name}: module {modname} is not part of this installation") from None
        raise UsageError(f"vidattn bench {name}: needs the package {e.name!r} (pip install {e.name})") from None
    if not hasattr(mod, "main"):
        raise UsageError(f"vidattn bench {name}: {modname} has no main(argv)")
    return mod


def run(a) -> int:
    if a.which is None:
        print("benchmarks (vidattn bench NAME --help for options):")
        for name, (modname, desc) in _benchmarks().items():
            print(f"  {name:<10} {desc}  [{modname}]")
        return 0
    mod = load_benchmark(a.which)
    try:
        return int(mod.main(list(a.rest)) or 0)
    except SystemExit as e:  # argparse --help / errors inside the benchmark
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
