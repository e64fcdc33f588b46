"""vidattn.pipelines: diffusers processors, apply/remove, timm swaps, tiny offline pipelines."""

from vidattn._lazy import lazy_attributes

__getattr__ = lazy_attributes(globals(), {
    "vidattn.pipelines.processors": ("SparseAttnProcessor",),
    "vidattn.pipelines.apply": ("SparseAttentionConfig", "SparseAttentionHandle", "apply", "remove"),
})
