"""Sparse attention families. Each is a frozen dataclass compiling to a BlockPlan.

One file per family: dense.py, neighborhood.py, radial.py, grid.py (PermutedGrid), rectified.py.
"""

import importlib

from .base import Pattern, StaticPattern
from .dense import Dense
from .neighborhood import Neighborhood, NeighborhoodRule

_LAZY = {
    "Radial": "vidattn.patterns.radial",
    "PermutedGrid": "vidattn.patterns.grid",
    "RectifiedSparse": "vidattn.patterns.rectified",
    "Clustered": "vidattn.patterns.clustered",
}


def __getattr__(name):
    if name in _LAZY:
        val = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = val
        return val
    raise AttributeError(f"module 'vidattn.patterns' has no attribute {name!r}")


__all__ = ["Pattern", "StaticPattern", "Dense", "Neighborhood", "NeighborhoodRule", "Radial", "PermutedGrid",
           "RectifiedSparse", "Clustered"]
