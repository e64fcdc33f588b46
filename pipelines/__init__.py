"""vidattn.pipelines: diffusers processors, apply/remove, timm swaps, tiny offline pipelines."""

import importlib

_LAZY = {
    "SparseAttnProcessor": ("vidattn.pipelines.processors", "SparseAttnProcessor"),
    "SparseAttentionConfig": ("vidattn.pipelines.apply", "SparseAttentionConfig"),
    "SparseAttentionHandle": ("vidattn.pipelines.apply", "SparseAttentionHandle"),
    "apply": ("vidattn.pipelines.apply", "apply"),
    "remove": ("vidattn.pipelines.apply", "remove"),
}


def __getattr__(name):
    if name in _LAZY:
        mod, attr = _LAZY[name]
        val = getattr(importlib.import_module(mod), attr)
        globals()[name] = val
        return val
    raise AttributeError(f"module 'vidattn.pipelines' has no attribute {name!r}")
