"""Token layout discovery for diffusers transformers.

A forward pre-hook on the transformer records, each call, the latent token grid after patchify
(``(T, H, W)`` for video models, ``(H, W)`` for FLUX) and where the text tokens sit in joint
attention (``"prefix"``: CogVideoX, FLUX; ``"suffix"``: HunyuanVideo; ``None``: Wan and LTX, which
use separate cross-attention). The number of text tokens is read at attention time as
``S - prod(grid)``, so single-stream and dual-stream blocks share one record.

The source is the transformer's forward arguments (:func:`layout_from_call`), read by the
pre-hook before ``forward`` runs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .families import FAMILIES, FAMILY_NAMES, transformer_family

__all__ = ["LayoutRecord", "family_of", "grid_rank", "call_arguments", "layout_from_call", "SUPPORTED_FAMILIES"]


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


def _hunyuan_call(model, a):
    _, _, f, h, w = _shape5(a["hidden_states"], "hidden_states [B, C, F, H, W]")
    p, pt = int(_cfg(model, "patch_size")), int(_cfg(model, "patch_size_t"))
    return LayoutRecord((f // pt, h // p, w // p), "suffix")


def _cog_grid(model, f, h, w):
    p = int(_cfg(model, "patch_size"))
    pt = _cfg(model, "patch_size_t")
    t = f if pt is None else f // int(pt)
    return (t, h // p, w // p)


def _cog_call(model, a):
    _, f, _, h, w = _shape5(a["hidden_states"], "hidden_states [B, F, C, H, W]")
    return LayoutRecord(_cog_grid(model, f, h, w), "prefix")


def _ltx_grid(model, f, h, w):
    p, pt = int(_cfg(model, "patch_size", 1)), int(_cfg(model, "patch_size_t", 1))
    return (int(f) // pt, int(h) // p, int(w) // p)


def _ltx_call(model, a):
    for n in ("num_frames", "height", "width"):
        if a.get(n) is None:
            raise ValueError(f"LTX-Video transformer call needs {n}= to know the latent grid")
    return LayoutRecord(_ltx_grid(model, a["num_frames"], a["height"], a["width"]), None)


def _flux_from_ids(img_ids) -> LayoutRecord:
    """FLUX grid from ``img_ids`` ``[S, 3]`` (or ``[B, S, 3]``): the main image tokens carry
    ``id[0] == 0`` and ``(row, col)`` ids that must tile a full ``(H, W)`` rectangle; tokens after
    them (FLUX Kontext reference images, ``id[0] != 0``) are an extra suffix. Raises ValueError
    when the ids describe no such grid (the hook then runs the model dense, with one warning)."""
    if not isinstance(img_ids, torch.Tensor) or img_ids.dim() not in (2, 3) or img_ids.shape[-1] != 3:
        raise ValueError("FLUX transformer call needs img_ids [S, 3] to know the latent grid, got "
                         f"{tuple(img_ids.shape) if isinstance(img_ids, torch.Tensor) else type(img_ids).__name__}")
    if img_ids.dim() == 3:
        img_ids = img_ids[0]
    ids = img_ids.detach().to("cpu", torch.float64)
    S = int(ids.shape[0])
    main = ids[:, 0] == 0  # FLUX Kontext appends reference-image tokens with id[0] = 1
    n_main = int(main.sum())
    if n_main == 0 or not bool(main[:n_main].all()):
        raise ValueError(f"img_ids do not start with a [0, row, col] grid ({n_main} of {S} tokens have id[0] == 0)")
    rows, cols = ids[:n_main, 1], ids[:n_main, 2]
    if not (bool((rows == rows.round()).all()) and bool((cols == cols.round()).all())):
        raise ValueError("img_ids rows/cols are not integers: not a [0, row, col] grid")
    h = int(rows.max()) - int(rows.min()) + 1
    w = int(cols.max()) - int(cols.min()) + 1
    expect_r = torch.arange(h, dtype=torch.float64).repeat_interleave(w) + rows.min()
    expect_c = torch.arange(w, dtype=torch.float64).repeat(h) + cols.min()
    if h * w != n_main or not (torch.equal(rows, expect_r) and torch.equal(cols, expect_c)):
        raise ValueError(f"img_ids do not describe a row-major (H, W) grid: {n_main} tokens, rows {h}, cols {w}")
    return LayoutRecord((h, w), "prefix", extra_suffix=S - n_main)


def _flux_call(model, a):
    return _flux_from_ids(a.get("img_ids"))


# family -> layout from call args
_CALLS: Dict[str, Callable] = {"wan": _wan_call, "hunyuan_video": _hunyuan_call, "cogvideox": _cog_call,
                               "ltx_video": _ltx_call, "flux": _flux_call}
SUPPORTED_FAMILIES = FAMILY_NAMES


def family_of(model) -> Optional[str]:
    """``"wan" | "hunyuan_video" | "cogvideox" | "ltx_video" | "flux"`` or None if unknown.
    Raises :class:`~vidattn.pipelines.families.UnsupportedModelError` for Mochi."""
    return transformer_family(model)


def grid_rank(model) -> Optional[int]:
    """Rank of the model's latent token grid (3 for video models, 2 for FLUX), None if unknown."""
    fam = transformer_family(model)
    return None if fam is None else FAMILIES[fam].grid_rank


def call_arguments(model, args: tuple, kwargs: dict) -> dict:
    """``model.forward``'s arguments of one call, by parameter name."""
    try:
        return dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)


def layout_from_call(model, args: tuple, kwargs: dict) -> LayoutRecord:
    """Layout of one ``model.forward(*args, **kwargs)`` call (before it runs).

    Raises ``TypeError`` for an unsupported model class, ``ValueError`` if the call does not carry
    the tensors the family's grid is derived from (or they describe no grid).
    """
    fam = transformer_family(model)
    if fam is None:
        raise TypeError(f"no layout discovery for {type(model).__name__}; supported: {FAMILY_NAMES}")
    return _CALLS[fam](model, call_arguments(model, args, kwargs))
