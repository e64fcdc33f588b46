"""The repository's benchmark scripts, installed as ``vidattn.benchmarks`` (``vidattn bench NAME`` imports them).

Each runs as a script (``python benchmarks/NAME.py``) or through ``vidattn bench``; importable helpers live in
:mod:`vidattn.bench`.
"""
