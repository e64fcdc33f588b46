"""vidattn: sparse attention for video and vision diffusion transformers.

Data path: TokenLayout -> Pattern -> BlockPlan -> backend (triton | flex | reference) -> processor.
"""

from ._lazy import lazy_attributes
from .attention import available_backends, precision, run_plan, sparse_attention
from .layout import TokenLayout, apply_permutation, invert_permutation
from .natten_compat import na1d, na2d, na3d
from .patterns import Dense, Neighborhood, Pattern
from .plan import BlockPlan, Rectification, TokenRule

__version__ = "0.1.0"

# Names resolved on first use, so importing vidattn stays light (no diffusers/timm import).
__getattr__ = lazy_attributes(globals(), {
    "vidattn.patterns": ("Radial", "PermutedGrid", "RectifiedSparse", "Clustered"),  # lazy there too
    "vidattn.pipelines.apply": ("apply", "remove", "SparseAttentionConfig"),
    "vidattn.pipelines.processors": ("SparseAttnProcessor",),
    "vidattn.plan_file": ("load_plan", "save_plan"),
}, submodules=("timm", "context_parallel", "kernels", "pipelines", "quality"))


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
    "precision",
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
