"""vidattn: sparse attention for video and vision diffusion transformers.

Data path: TokenLayout -> Pattern -> BlockPlan -> backend (triton | flex | reference) -> processor.
"""

import importlib

from .attention import available_backends, run_plan, sparse_attention
from .layout import TokenLayout, apply_permutation, invert_permutation
from .natten_compat import na1d, na2d, na3d
from .patterns import Dense, Neighborhood, Pattern
from .plan import BlockPlan, Rectification, TokenRule

__version__ = "0.1.0"

# Names resolved on first use, so importing vidattn stays light (no diffusers/timm import).
_LAZY = {
    "Radial": ("vidattn.patterns.radial", "Radial"),
    "PermutedGrid": ("vidattn.patterns.grid", "PermutedGrid"),
    "RectifiedSparse": ("vidattn.patterns.rectified", "RectifiedSparse"),
    "Clustered": ("vidattn.patterns.clustered", "Clustered"),
    "apply": ("vidattn.pipelines.apply", "apply"),
    "remove": ("vidattn.pipelines.apply", "remove"),
    "SparseAttentionConfig": ("vidattn.pipelines.apply", "SparseAttentionConfig"),
    "timm": ("vidattn.timm", None),
    "SparseAttnProcessor": ("vidattn.pipelines.processors", "SparseAttnProcessor"),
    "context_parallel": ("vidattn.context_parallel", None),
    "kernels": ("vidattn.kernels", None),
    "pipelines": ("vidattn.pipelines", None),
    "quality": ("vidattn.quality", None),
    "load_plan": ("vidattn.plan_file", "load_plan"),
    "save_plan": ("vidattn.plan_file", "save_plan"),
}


def __getattr__(name):
    if name in _LAZY:
        mod_name, attr = _LAZY[name]
        mod = importlib.import_module(mod_name)
        val = mod if attr is None else getattr(mod, attr)
        globals()[name] = val
        return val
    raise AttributeError(f"module 'vidattn' has no attribute {name!r}")


__all__ = [
    "TokenLayout",
    "invert_permutation",
    "apply_permutation",
    "Pattern",
    "Dense",
    "Neighborhood",
    "Radial",
    "PermutedGrid",
    "RectifiedSparse",
    "Clustered",
    "BlockPlan",
    "TokenRule",
    "Rectification",
    "sparse_attention",
    "run_plan",
    "available_backends",
    "na1d",
    "na2d",
    "na3d",
    "apply",
    "remove",
    "SparseAttentionConfig",
    "load_plan",
    "save_plan",
    "SparseAttnProcessor",
]
