"""Sparse attention families. Each is a frozen dataclass compiling to a BlockPlan.

One file per family: dense.py, neighborhood.py, radial.py, grid.py (PermutedGrid), rectified.py.
"""

from vidattn._lazy import lazy_attributes

from .base import Pattern, StaticPattern
from .dense import Dense
from .neighborhood import Neighborhood, NeighborhoodRule

__getattr__ = lazy_attributes(globals(), {
    "vidattn.patterns.radial": ("Radial",),
    "vidattn.patterns.grid": ("PermutedGrid",),
    "vidattn.patterns.rectified": ("RectifiedSparse",),
    "vidattn.patterns.clustered": ("Clustered",),
})


__all__ = ["Pattern", "StaticPattern", "Dense", "Neighborhood", "NeighborhoodRule", "Radial", "PermutedGrid",
           "RectifiedSparse", "Clustered"]
