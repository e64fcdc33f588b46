"""``vidattn.timm``: swap the attention of timm vision transformers for vidattn sparse attention.

Importable as ``import vidattn.timm`` / ``from vidattn.timm import swap_attention`` (the README's
spelling). The implementation lives in :mod:`vidattn.pipelines.timm`; this module re-exports its
public API so both names refer to the same objects.
"""

from vidattn.pipelines.timm import (  # noqa: F401
    SparseTimmAttention,
    restore_attention,
    supported_attention_types,
    swap_attention,
    swapped_blocks,
)

__all__ = ["swap_attention", "restore_attention", "swapped_blocks", "SparseTimmAttention", "supported_attention_types"]
