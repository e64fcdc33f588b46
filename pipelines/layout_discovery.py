"""Token layout discovery for diffusers transformers.

A forward pre-hook on the transformer records, each call, the latent token grid after patchify
(``(T, H, W)`` for video models, ``(H, W)`` for FLUX) and where the text tokens sit in joint
attention (``"prefix"``: CogVideoX, FLUX; ``"suffix"``: HunyuanVideo; ``None``: Wan and LTX, which
use separate cross-attention). The number of text tokens is read at attention time as
``S - prod(grid)``, so single-stream and dual-stream blocks share one record.

Two sources per family:

* :func:`layout_from_call` — the transformer's forward arguments (used by the pre-hook);
* :func:`layout_from_frame` — the local variables of a running ``forward`` (used once by a
  manually installed processor that finds its model mid-call, before its hook exists).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["LayoutRecord", "family_of", "grid_rank", "call_arguments", "layout_from_call", "layout_from_frame", "SUPPORTED_FAMILIES"]


@dataclass(frozen=True)
class LayoutRecord:
    """What the pre-hook learned from one transformer call.

    Attributes:
        grid: latent token grid after patchify, ``(T, H, W)`` or ``(H, W)``.
        text: ``"prefix"`` (text first), ``"suffix"`` (text last) or ``None`` (no joint text).
        extra_suffix: non-text, non-grid tokens after the grid (e.g. FLUX Kontext reference
            image tokens); 0 for the supported models.
    """

    grid: Tuple[int, ...]
    text: Optional[str] = None
    extra_suffix: int = 0


def _config(model):
    return getattr(model, "config", None)


def _cfg(model, name, default=None):
    cfg = _config(model)
    if cfg is None:
        return default
    return getattr(cfg, name, cfg.get(name, default) if hasattr(cfg, "get") else default)


def _as3(p):
    if isinstance(p, int):
        return (1, p, p)
    return tuple(int(x) for x in p)


def _shape5(x, name):
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        raise ValueError(f"{name} must be a 5-D latent tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    return tuple(int(s) for s in x.shape)


# ----------------------------------------------------------------------------- per family
def _wan_call(model, a):
    _, _, f, h, w = _shape5(a["hidden_states"], "hidden_states [B, C, F, H, W]")
    pt, ph, pw = _as3(_cfg(model, "patch_size"))
    return LayoutRecord((f // pt, h // ph, w // pw), None)


def _wan_frame(model, loc):
    return LayoutRecord((int(loc["post_patch_num_frames"]), int(loc["post_patch_height"]),
                         int(loc["post_patch_width"])), None)


def _hunyuan_call(model, a):
    _, _, f, h, w = _shape5(a["hidden_states"], "hidden_states [B, C, F, H, W]")
    p, pt = int(_cfg(model, "patch_size")), int(_cfg(model, "patch_size_t"))
    return LayoutRecord((f // pt, h // p, w // p), "suffix")


def _hunyuan_frame(model, loc):
    return LayoutRecord((int(loc["post_patch_num_frames"]), int(loc["post_patch_height"]),
                         int(loc["post_patch_width"])), "suffix")


def _cog_grid(model, f, h, w):
    p = int(_cfg(model, "patch_size"))
    pt = _cfg(model, "patch_size_t")
    t = f if pt is None else f // int(pt)
    return (t, h // p, w // p)


def _cog_call(model, a):
    _, f, _, h, w = _shape5(a["hidden_states"], "hidden_states [B, F, C, H, W]")
    return LayoutRecord(_cog_grid(model, f, h, w), "prefix")


def _cog_frame(model, loc):
    return LayoutRecord(_cog_grid(model, int(loc["num_frames"]), int(loc["height"]), int(loc["width"])), "prefix")


def _ltx_grid(model, f, h, w):
    p, pt = int(_cfg(model, "patch_size", 1)), int(_cfg(model, "patch_size_t", 1))
    return (int(f) // pt, int(h) // p, int(w) // p)


def _ltx_call(model, a):
    for n in ("num_frames", "height", "width"):
        if a.get(n) is None:
            raise ValueError(f"LTX-Video transformer call needs {n}= to know the latent grid")
    return LayoutRecord(_ltx_grid(model, a["num_frames"], a["height"], a["width"]), None)


def _ltx_frame(model, loc):
    return _ltx_call(model, loc)


def _flux_from_ids(img_ids: torch.Tensor, seq_len: int) -> LayoutRecord:
    if not isinstance(img_ids, torch.Tensor) or img_ids.shape[-1] != 3:
        raise ValueError("FLUX transformer call needs img_ids [S, 3] to know the latent grid")
    if img_ids.dim() == 3:
        img_ids = img_ids[0]
    main = img_ids[:, 0] == 0  # FLUX Kontext appends reference-image tokens with id[0] = 1
    n_main = int(main.sum())
    ids = img_ids[:n_main]
    h = int(ids[:, 1].max()) - int(ids[:, 1].min()) + 1
    w = int(ids[:, 2].max()) - int(ids[:, 2].min()) + 1
    if h * w != n_main:
        raise ValueError(f"img_ids do not describe a full (H, W) grid: {n_main} tokens, rows {h}, cols {w}")
    return LayoutRecord((h, w), "prefix", extra_suffix=int(img_ids.shape[0]) - n_main)


def _flux_call(model, a):
    return _flux_from_ids(a.get("img_ids"), 0)


def _flux_frame(model, loc):
    return _flux_from_ids(loc.get("img_ids"), 0)


# class name -> (family, grid rank, from call args, from frame locals)
_FAMILIES: Dict[str, Tuple[str, int, Callable, Callable]] = {
    "WanTransformer3DModel": ("wan", 3, _wan_call, _wan_frame),
    "WanVACETransformer3DModel": ("wan", 3, _wan_call, _wan_frame),
    "HunyuanVideoTransformer3DModel": ("hunyuan_video", 3, _hunyuan_call, _hunyuan_frame),
    "CogVideoXTransformer3DModel": ("cogvideox", 3, _cog_call, _cog_frame),
    "LTXVideoTransformer3DModel": ("ltx_video", 3, _ltx_call, _ltx_frame),
    "FluxTransformer2DModel": ("flux", 2, _flux_call, _flux_frame),
}
SUPPORTED_FAMILIES = tuple(sorted({v[0] for v in _FAMILIES.values()}))


def _entry(model):
    for cls in type(model).__mro__:
        if cls.__name__ in _FAMILIES:
            return _FAMILIES[cls.__name__]
    return None


def family_of(model) -> Optional[str]:
    """``"wan" | "hunyuan_video" | "cogvideox" | "ltx_video" | "flux"`` or None if unknown."""
    e = _entry(model)
    return None if e is None else e[0]


def grid_rank(model) -> Optional[int]:
    """Rank of the model's latent token grid (3 for video models, 2 for FLUX), None if unknown."""
    e = _entry(model)
    return None if e is None else e[1]


def call_arguments(model, args: tuple, kwargs: dict) -> dict:
    """``model.forward``'s arguments of one call, by parameter name."""
    try:
        return dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)


def layout_from_call(model, args: tuple, kwargs: dict) -> LayoutRecord:
    """Layout of one ``model.forward(*args, **kwargs)`` call (before it runs).

    Raises ``TypeError`` for an unsupported model class, ``ValueError`` if the call does not carry
    the tensors the family's grid is derived from.
    """
    e = _entry(model)
    if e is None:
        raise TypeError(f"no layout discovery for {type(model).__name__}; supported: {sorted(_FAMILIES)}")
    return e[2](model, call_arguments(model, args, kwargs))


def layout_from_frame(model, frame_locals: dict) -> LayoutRecord:
    """Layout of a ``model.forward`` that is running, from its local variables."""
    e = _entry(model)
    if e is None:
        raise TypeError(f"no layout discovery for {type(model).__name__}; supported: {sorted(_FAMILIES)}")
    return e[3](model, frame_locals)
