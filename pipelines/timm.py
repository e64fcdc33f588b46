"""Swap the attention of timm vision transformers for vidattn sparse attention.

``swap_attention(model, pattern, blocks)`` replaces ``model.blocks[i].attn`` by a
:class:`SparseTimmAttention` that *shares* the original module's parameters, buffers and
sub-modules (``qkv`` or ``q_proj/k_proj/v_proj``, ``q_bias/k_bias/v_bias``, ``q_norm``,
``k_norm``, ``norm``, ``gate``, ``proj``, dropouts) under the same names. Hence:

* the model's ``state_dict`` keys and its ``parameters()`` objects are unchanged, checkpoints load
  before or after a swap, and an optimizer created before the swap keeps training the same tensors;
* :func:`restore_attention` puts the original modules back (with whatever the shared tensors hold
  by then), giving bit-identical outputs to a never-swapped model.

Token layout: timm sequences are ``[prefix tokens (CLS / registers / distillation), patch grid
(row-major Hp x Wp)]``, so each swapped block attends over
``TokenLayout(grid=(Hp, Wp), prefix=model.num_prefix_tokens)``. The grid is read at run time by a
forward pre-hook on ``model.patch_embed`` (``patch_embed.dynamic_feat_size`` of the input image),
so ``dynamic_img_size=True`` models work at any resolution. Prefix tokens attend and are attended
densely by the patterns that default to it (e.g. ``Neighborhood(dense_nongrid=True)``).
Frame-based patterns can run with ``rows_as_frames=True`` on ``TokenLayout((Hp, 1, Wp))`` (patch
rows as frames, same token order): the default for ``PermutedGrid``, whose spatial / temporal /
grid heads then mean bands of rows / columns / strided columns.

How the swap runs: a :class:`SparseTimmAttention` runs *timm's own* ``forward`` of the original
class (the same code object, re-bound to globals in which ``F`` is torch.nn.functional except for
``F.scaled_dot_product_attention``, which becomes :func:`vidattn.sparse_attention` on the recorded
layout), with timm's fused-attention branch forced on. qk-norm, scale-norm, gating, EVA's separate
q/v biases, rotary embeddings, GQA and any later change timm makes around the attention call are
therefore timm's code, not a copy. Supported classes: ``timm.layers.Attention`` (ViT, DeiT, ViT
with registers, DINOv2), ``timm.layers.AttentionRope`` and ``timm.models.eva.EvaAttention``
(EVA-02, ``vit_*_rope_*``). Anything else raises ``TypeError``.

Tracing: swapped models are FX-traceable. timm's FX helpers (``create_feature_extractor``,
``get_graph_node_names``) keep a swapped module as one leaf node (registered with
``timm.layers.register_notrace_module``); plain ``torch.fx.symbolic_trace`` traces through timm's
forward and records the attention call as the leaf function ``_sparse_sdpa`` (the layout is read
when the graph runs). Under FX the grid is the one of the model's last eager ``patch_embed`` call
(or its default ``grid_size``), because traced graphs call ``patch_embed``'s children, not its hook.
TorchScript is not supported: ``torch.jit.script`` raises a ``TypeError`` that says so (use
``torch.compile``/FX, or :func:`restore_attention` first).

Not supported (clear errors): ``attn_mask`` / ``is_causal`` at call time, attention dropout > 0
in training mode, token dropping (``patch_drop``) that breaks the grid, patterns that need frames
(``Radial``) unless ``rows_as_frames=True`` is asked for.
One grid is recorded per model, so do not run one model concurrently from several threads at
different resolutions.
"""

from __future__ import annotations

import contextvars
import math
import types
import weakref
from typing import Iterable, List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from vidattn.attention import BACKENDS, sparse_attention
from vidattn.layout import TokenLayout
from vidattn.patterns.base import Pattern

__all__ = ["swap_attention", "restore_attention", "swapped_blocks", "SparseTimmAttention", "supported_attention_types"]

_TRACKER_ATTR = "_vidattn_grid_tracker"
# grid used to check a pattern's rank for dynamic_img_size models (sizes are checked at run time)
_LARGE_GRID = (4096, 4096)
# frame-based patterns that run on patch rows as frames by default (rows_as_frames=None)
_ROW_FRAME_PATTERNS = ("PermutedGrid",)


# --------------------------------------------------------------------------- supported classes
def supported_attention_types() -> dict:
    """Map timm attention class -> ``"plain"`` (``forward(x, attn_mask, is_causal)``) or ``"rope"``
    (``forward(x, rope, attn_mask, is_causal)``)."""
    from timm.layers import Attention, AttentionRope

    out = {Attention: "plain", AttentionRope: "rope"}
    try:
        from timm.models.eva import EvaAttention

        out[EvaAttention] = "rope"
    except ImportError:  # pragma: no cover - very old timm
        pass
    return out


def _attention_kind(module: nn.Module) -> Optional[str]:
    """``"plain"`` / ``"rope"`` for a supported module (a subclass counts only if it keeps the
    parent's forward), else None."""
    for cls, kind in supported_attention_types().items():
        if isinstance(module, cls) and type(module).forward is cls.forward:
            return kind
    return None


# --------------------------------------------------------------------------- run-time grid
class _GridTracker:
    """Holds the patch grid ``(Hp, Wp)`` of the model's latest ``patch_embed`` call."""

    def __init__(self, default_grid: Tuple[int, int]):
        self.grid = tuple(int(g) for g in default_grid)

    def record(self, module: nn.Module, args) -> None:
        """Forward pre-hook on ``patch_embed``: ``args[0]`` is the image ``[B, C, H, W]``."""
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return
        feat = getattr(module, "dynamic_feat_size", None)
        if feat is not None:
            self.grid = tuple(int(g) for g in feat((int(x.shape[-2]), int(x.shape[-1]))))
        elif getattr(module, "grid_size", None) is not None:
            self.grid = tuple(int(g) for g in module.grid_size)


def _install_tracker(model: nn.Module) -> _GridTracker:
    tracker = model.__dict__.get(_TRACKER_ATTR)
    if tracker is None:
        tracker = _GridTracker(_default_grid(model))
        model.patch_embed.register_forward_pre_hook(tracker.record)
        object.__setattr__(model, _TRACKER_ATTR, tracker)
    return tracker


def _remove_tracker(model: nn.Module) -> None:
    tracker = model.__dict__.pop(_TRACKER_ATTR, None)
    if tracker is None:
        return
    hooks = model.patch_embed._forward_pre_hooks
    for key in [k for k, fn in hooks.items() if getattr(fn, "__self__", None) is tracker]:
        del hooks[key]


def _default_grid(model: nn.Module) -> Tuple[int, int]:
    grid = getattr(model.patch_embed, "grid_size", None)
    if grid is None or len(tuple(grid)) != 2:
        raise TypeError(f"model.patch_embed.grid_size must be a (Hp, Wp) tuple, got {grid!r}")
    return tuple(int(g) for g in grid)


def _token_layout(grid: Tuple[int, int], prefix: int, rows_as_frames: bool) -> TokenLayout:
    """``TokenLayout((Hp, Wp), prefix)``, or ``((Hp, 1, Wp), prefix)`` with patch rows as frames
    (same row-major token order, so no data moves)."""
    if rows_as_frames:
        return TokenLayout(grid=(grid[0], 1, grid[1]), prefix=prefix)
    return TokenLayout(grid=tuple(grid), prefix=prefix)


# --------------------------------------------------------------------------- the swapped module
class SparseTimmAttention(nn.Module):
    """Drop-in replacement of a timm attention module computing :func:`vidattn.sparse_attention`.

    Shares (does not copy) the original module's parameters, buffers and sub-modules under the
    same names, so ``state_dict`` keys are identical. Other attributes (``num_heads``,
    ``head_dim``, ``scale``, ...) are read from the original module.

    Call: ``forward(x)`` with ``x`` float ``[B, N, C]``, ``N = num_prefix_tokens + Hp * Wp``;
    returns ``[B, N, dim_out]`` in x's dtype (``rope`` too for rope-style modules).
    """

    def __init__(self, original: nn.Module, pattern: Pattern, tracker: _GridTracker, num_prefix_tokens: int,
                 backend: str = "auto", block_index: int = -1, rows_as_frames: bool = False):
        super().__init__()
        kind = _attention_kind(original)
        if kind is None:
            raise TypeError(f"unsupported attention class {type(original).__module__}.{type(original).__name__}")
        object.__setattr__(self, "_vidattn_original", original)
        object.__setattr__(self, "_tracker", tracker)
        self.pattern = pattern
        self.backend = backend
        self.num_prefix_tokens_layout = int(num_prefix_tokens)
        self.block_index = block_index
        self.rows_as_frames = bool(rows_as_frames)
        self.kind = kind
        self.training = original.training
        for name, mod in original._modules.items():
            self._modules[name] = mod
        for name, p in original._parameters.items():
            self._parameters[name] = p
        for name, b in original._buffers.items():
            self._buffers[name] = b
        self._non_persistent_buffers_set = set(original._non_persistent_buffers_set)
        self.fused_attn = True  # timm's forward takes its F.scaled_dot_product_attention branch
        _register_fx_leaf()

    # attributes that are not tensors/modules (num_heads, scale, gate=None, ...) come from the original
    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            orig = self.__dict__.get("_vidattn_original")
            if orig is None or name.startswith("__"):
                raise
            return getattr(orig, name)

    @property
    def original(self) -> nn.Module:
        """The wrapped timm module (its own tensors may be stale until :meth:`unwrap`)."""
        return self.__dict__["_vidattn_original"]

    def unwrap(self) -> nn.Module:
        """Write the shared tensors/sub-modules (possibly replaced by ``.to()`` or by the user)
        back into the original module and return it."""
        orig = self.original
        for store in ("_modules", "_parameters", "_buffers"):
            src, dst = getattr(self, store), getattr(orig, store)
            for name in list(dst.keys()):
                if name in src:
                    dst[name] = src[name]
        orig.training = self.training  # children are shared: their own modes are already right
        return orig

    def extra_repr(self) -> str:
        return (f"block={self.block_index}, original={type(self.original).__name__}, pattern={self.pattern!r}, "
                f"backend={self.backend!r}" + (", rows_as_frames=True" if self.rows_as_frames else ""))

    def _layout(self, num_tokens: int) -> TokenLayout:
        grid = self._tracker.grid
        prefix = self.num_prefix_tokens_layout
        if prefix + math.prod(grid) != num_tokens:
            raise ValueError(
                f"vidattn.timm (block {self.block_index}): the sequence has {num_tokens} tokens but the patch grid "
                f"{grid} of the last patch_embed call plus {prefix} prefix tokens gives {prefix + math.prod(grid)}. "
                f"Token dropping (patch_drop / patch dropout), token merging or calling blocks without "
                f"model.patch_embed is not supported by swapped sparse attention")
        return _token_layout(grid, prefix, self.rows_as_frames)

    def forward(self, *args, **kwargs):
        """timm's own forward of the original class (same signature: ``x [B, N, C]`` plus ``rope`` for
        rotary modules, ``attn_mask``, ``is_causal``), with only its ``F.scaled_dot_product_attention``
        call replaced by :func:`vidattn.sparse_attention` on the recorded layout."""
        state = [self, False]
        token = _CURRENT.set(state)
        try:
            out = _timm_forward(type(self.original))(self, *args, **kwargs)
        finally:
            _CURRENT.reset(token)
        if not state[1]:
            raise RuntimeError(f"vidattn.timm (block {self.block_index}): {type(self.original).__name__}.forward did "
                               f"not call F.scaled_dot_product_attention, so the sparse pattern was not applied")
        return out

    def __prepare_scriptable__(self):
        raise TypeError(
            "vidattn.timm: a model with swapped sparse attention cannot be compiled with torch.jit.script "
            "(TorchScript cannot compile the plan construction, the grid tracking hook or the Triton/flex "
            "backends). Use torch.compile, torch.fx (timm's create_feature_extractor works) or eager mode, "
            "or call vidattn.timm.restore_attention(model) before scripting")


# SparseTimmAttention is one class for every supported signature (the forward is timm's own);
# the name of the rotary variant is kept for code that refers to it
SparseTimmRopeAttention = SparseTimmAttention


# --------------------------------------------------------------------------- the attention call
_CURRENT: "contextvars.ContextVar[list]" = contextvars.ContextVar("vidattn_timm_current")
_by_id: "weakref.WeakValueDictionary[int, SparseTimmAttention]" = weakref.WeakValueDictionary()


def _sparse_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, module_id: int, attn_mask=None,
                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` of swapped module ``module_id`` on ``q [B, H, N, D]``,
    ``k/v [B, Hk, N, D]`` -> ``[B, H, N, Dv]`` (a leaf function for torch.fx: the layout is read when
    it runs, never while tracing)."""
    module = _by_id[module_id]
    if attn_mask is not None or is_causal:
        raise ValueError(f"vidattn.timm (block {module.block_index}): attn_mask / is_causal cannot be combined with "
                         f"a sparse attention pattern; call vidattn.timm.restore_attention(model) first")
    if dropout_p > 0:
        raise ValueError(f"vidattn.timm (block {module.block_index}): attention dropout (p={dropout_p}) is not "
                         f"supported by sparse attention in training mode; set blocks[i].attn.attn_drop.p = 0")
    layout = module._layout(q.shape[2])
    out = sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), module.pattern, layout,
                           backend=module.backend, scale=scale)
    return out.transpose(1, 2)


torch.fx.wrap("_sparse_sdpa")


class _SparseFunctional:
    """Stands for ``torch.nn.functional`` inside timm's forward: ``scaled_dot_product_attention`` is
    the swapped module's sparse attention, every other name is torch's."""

    def __getattr__(self, name):
        return getattr(F, name)

    @staticmethod
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                     enable_gqa=False):
        state = _CURRENT.get()
        state[1] = True
        module = state[0]
        _by_id[id(module)] = module
        return _sparse_sdpa(query, key, value, id(module), attn_mask, dropout_p, is_causal, scale)


_SPARSE_F = _SparseFunctional()
_forwards: dict = {}


def _timm_forward(cls):
    """``cls.forward`` re-bound to globals where ``F`` is :class:`_SparseFunctional` (the timm
    code object itself, unchanged)."""
    fn = _forwards.get(cls)
    if fn is None:
        orig = cls.forward
        code = orig.__code__
        if "F" not in code.co_names or "scaled_dot_product_attention" not in code.co_names:
            raise TypeError(f"{cls.__name__}.forward does not call F.scaled_dot_product_attention; vidattn.timm "
                            f"cannot replace its attention")
        glb = dict(orig.__globals__)
        glb["F"] = _SPARSE_F
        fn = types.FunctionType(code, glb, orig.__name__, orig.__defaults__, orig.__closure__)
        fn.__kwdefaults__ = orig.__kwdefaults__
        _forwards[cls] = fn
    return fn


def _register_fx_leaf() -> None:
    """Make timm's FX helpers (``create_feature_extractor``, ``get_graph_node_names``) keep a swapped
    module as one node (plain ``torch.fx.symbolic_trace`` traces through it: the attention call is a
    leaf function)."""
    try:
        from timm.layers import register_notrace_module
    except ImportError:  # pragma: no cover - very old timm
        return
    register_notrace_module(SparseTimmAttention)


# --------------------------------------------------------------------------- public API
def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a timm vision transformer (nn.Module), got {type(model).__name__}")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        raise TypeError(f"model must have a .blocks Sequential/ModuleList of transformer blocks "
                        f"(timm VisionTransformer, DeiT, Eva, ...); {type(model).__name__} has none")
    if not isinstance(getattr(model, "patch_embed", None), nn.Module):
        raise TypeError(f"model must have a .patch_embed module; {type(model).__name__} has none")
    npt = getattr(model, "num_prefix_tokens", None)
    if isinstance(npt, bool) or not isinstance(npt, int) or npt < 0:
        raise TypeError(f"model.num_prefix_tokens must be an int >= 0, got {npt!r}")


def _select_blocks(blocks, num_blocks: int) -> List[int]:
    if blocks is None:
        return list(range(num_blocks))
    if isinstance(blocks, (int, slice)) and not isinstance(blocks, bool):
        blocks = [blocks] if isinstance(blocks, int) else range(num_blocks)[blocks]
    try:
        items = list(blocks)
    except TypeError:
        raise TypeError(f"blocks must be None, an int, a slice or an iterable of ints, got {type(blocks).__name__}")
    out = []
    for b in items:
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"blocks entries must be ints, got {b!r}")
        if not -num_blocks <= b < num_blocks:
            raise ValueError(f"block index {b} out of range for a model with {num_blocks} blocks")
        b = b % num_blocks
        if b not in out:
            out.append(b)
    return out


def _resolve_rows_as_frames(pattern, rows_as_frames) -> bool:
    if rows_as_frames is None:  # auto: patterns whose frame axes read naturally as image rows/columns
        return bool(getattr(pattern, "needs_frames", False)) and type(pattern).__name__ in _ROW_FRAME_PATTERNS
    if not isinstance(rows_as_frames, bool):
        raise TypeError(f"rows_as_frames must be None, True or False, got {rows_as_frames!r}")
    return rows_as_frames


def _check_pattern(pattern, model, rows_as_frames: bool) -> None:
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a vidattn pattern (Neighborhood, Dense, RectifiedSparse, PermutedGrid, ...), "
                        f"got {type(pattern).__name__}")
    if getattr(pattern, "needs_frames", False) and not rows_as_frames:
        raise ValueError(f"{type(pattern).__name__} needs a (T, H, W) video grid but a timm ViT has a 2-D (Hp, Wp) "
                         f"patch grid; use a 2-D pattern such as Neighborhood(kernel_size=13), or pass "
                         f"rows_as_frames=True to run it on the (Hp, 1, Wp) grid (patch rows as frames)")
    npt = model.num_prefix_tokens
    grid = _LARGE_GRID if getattr(model, "dynamic_img_size", False) else _default_grid(model)
    layout = _token_layout(grid, npt, rows_as_frames)
    try:
        pattern.validate(layout)
    except (ValueError, TypeError) as e:
        where = "a 2-D patch grid" if grid == _LARGE_GRID else f"the model's {grid[0]}x{grid[1]} patch grid"
        raise ValueError(f"pattern {pattern!r} cannot run on {where} (layout grid {layout.grid}, prefix {npt}): "
                         f"{e}") from e


def swap_attention(model: nn.Module, pattern: Pattern, blocks: Optional[Iterable[int]] = None, *,
                   backend: str = "auto", rows_as_frames: Optional[bool] = None) -> nn.Module:
    """Make the selected blocks of a timm ViT use ``pattern`` sparse attention (in place).

    Args:
        model: timm ``VisionTransformer`` / DeiT / ``Eva``-family model: ``.blocks[i].attn`` a
            supported attention module (see :func:`supported_attention_types`), ``.patch_embed``
            and ``.num_prefix_tokens``.
        pattern: a 2-D vidattn pattern, run on ``TokenLayout((Hp, Wp), prefix=num_prefix_tokens)``.
        blocks: block indices (ints, negative allowed, a ``range`` or a slice); None = all blocks.
            Blocks already swapped are re-swapped from their original module (no stacking);
            blocks not selected keep what they have.
        backend: vidattn backend (``"auto"``: triton on CUDA, reference on CPU).
        rows_as_frames: run the pattern on ``TokenLayout((Hp, 1, Wp))`` (patch rows as "frames",
            the token order is unchanged) so that frame-based patterns get image meanings:
            PermutedGrid's "spatial" heads become bands of nearby rows, "temporal" heads
            columns, "grid" heads strided columns. None (default): True for PermutedGrid only;
            other patterns with ``needs_frames`` (e.g. Radial) are refused unless True is passed.
    Returns:
        ``model`` (same object). Its ``state_dict`` keys and parameter objects are unchanged.
    Raises:
        TypeError: not a timm ViT, a non-pattern, or an unsupported attention class.
        ValueError: pattern needs frames / has the wrong rank / does not fit the grid, bad ``blocks``.
    """
    _check_model(model)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    rows_as_frames = _resolve_rows_as_frames(pattern, rows_as_frames)
    _check_pattern(pattern, model, rows_as_frames)
    indices = _select_blocks(blocks, len(model.blocks))
    originals = {}
    for i in indices:
        attn = getattr(model.blocks[i], "attn", None)
        if isinstance(attn, SparseTimmAttention):
            attn = attn.unwrap()
        if attn is None or _attention_kind(attn) is None:
            raise TypeError(f"block {i} ({type(model.blocks[i]).__name__}) has attention "
                            f"{type(attn).__name__ if attn is not None else None}; supported: "
                            f"{sorted(c.__name__ for c in supported_attention_types())} exposed as block.attn")
        originals[i] = attn
    tracker = _install_tracker(model)
    for i, attn in originals.items():
        model.blocks[i].attn = SparseTimmAttention(attn, pattern, tracker, model.num_prefix_tokens, backend=backend, block_index=i,
                                   rows_as_frames=rows_as_frames)
    return model


def restore_attention(model: nn.Module, blocks: Optional[Iterable[int]] = None) -> nn.Module:
    """Put the original timm attention modules back (in place; blocks None = all swapped ones).

    The original modules get the current shared tensors, so outputs are bit-identical to the
    model before any swap (given the same weights). Returns ``model``.
    """
    _check_model(model)
    for i in _select_blocks(blocks, len(model.blocks)):
        attn = getattr(model.blocks[i], "attn", None)
        if isinstance(attn, SparseTimmAttention):
            model.blocks[i].attn = attn.unwrap()
    if not swapped_blocks(model):
        _remove_tracker(model)
    return model


def swapped_blocks(model: nn.Module) -> List[int]:
    """Indices of the blocks whose attention is currently swapped."""
    _check_model(model)
    return [i for i, b in enumerate(model.blocks) if isinstance(getattr(b, "attn", None), SparseTimmAttention)]
