"""Pattern presets fitted to the token grid they will run on, at a target attention sparsity.

A preset turns ``(target sparsity, grid)`` into the keyword arguments of one pattern family, so the
same name (``"neighborhood"``, ``"radial"``, ...) works on every model: a 3 x 4 x 4 tiny grid gets a
kernel that fits it, a 16 x 24 x 24 grid one that is sparse enough. Static families are fitted
exactly (their token density is measured from the plan on the grid); dynamic families set their
sparsity knob and a block size that leaves the grid several blocks (their achieved density is
measured at run time and reported).

The table :data:`PRESETS` maps a preset name to :class:`Preset` (a pattern registry name from
:data:`vidattn.config.PATTERNS` + a fit function). Adding a family is one line::

    register_preset("clustered", fit=fit_keep_fraction)          # registry name = preset name
    register_preset("radial_authors", "radial", fit_radial)       # another registry entry / fit

A name found in the pattern registry but not in the table gets :func:`fit_generic` (block size
fitted, a ``keep``/``density``-like field set to ``1 - sparsity`` when the pattern has one).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

__all__ = ["Preset", "PRESETS", "register_preset", "preset_names", "fit_pattern", "fit_kwargs", "fit_block_size",
           "radial_density", "fit_neighborhood", "fit_radial", "fit_grid", "fit_keep_fraction", "fit_generic", "token_density"]

Grid = Tuple[int, ...]


@dataclass(frozen=True)
class Preset:
    """A fitted preset: ``pattern`` (name in :data:`vidattn.config.PATTERNS`) and ``fit(sparsity,
    grid, pattern_cls) -> kwargs``."""

    pattern: str
    fit: Callable[[float, Grid, type], Dict[str, Any]]


PRESETS: Dict[str, Preset] = {}


def register_preset(name: str, pattern: Optional[str] = None, fit: Optional[Callable] = None) -> None:
    """Add (or replace) the preset ``name`` for registry pattern ``pattern`` (default: ``name``)
    fitted by ``fit`` (default: :func:`fit_generic`)."""
    PRESETS[str(name)] = Preset(str(pattern or name), fit or fit_generic)


def _grid_tokens(grid: Grid) -> int:
    return int(math.prod(int(g) for g in grid))


def fit_block_size(grid: Grid, min_blocks: int = 8, sizes: Sequence[int] = (128, 64, 32, 16)) -> int:
    """Largest block size in ``sizes`` leaving at least ``min_blocks`` blocks on the grid (else the smallest)."""
    n = _grid_tokens(grid)
    for b in sizes:
        if n // b >= min_blocks:
            return int(b)
    return int(sizes[-1])


def token_density(pattern, grid: Grid, max_rows: int = 512) -> float:
    """Token density (fraction of allowed (query, key) pairs) of a static ``pattern`` on ``grid``
    (no text tokens): its token rule evaluated on ``max_rows`` evenly spaced query rows (all rows
    when the grid has fewer tokens), so O(max_rows * S) work. Patterns without a ``rule`` are
    measured from their plan."""
    import torch

    from vidattn.layout import TokenLayout

    lay = TokenLayout(tuple(int(g) for g in grid))
    if not hasattr(pattern, "rule"):
        return float(pattern.plan(lay, num_heads=1).token_density)
    rule = pattern.rule(lay)
    S = lay.seq_len
    rows = torch.arange(S) if S <= max_rows else torch.linspace(0, S - 1, max_rows).round().long().unique()
    m = rule(torch.tensor(0), rows[:, None], torch.arange(S)[None, :])
    return float(m.float().mean())


def radial_density(pattern, grid: Grid) -> float:
    """Exact token density of a ``Radial`` pattern on a ``(T, H, W)`` grid without text, from its
    per-distance ``(width, keep)`` tables (O(T) work): frame pairs at distance ``d`` (``T`` for
    ``d = 0``, ``2 (T - d)`` otherwise) times the in-frame pairs with ``|r - c| <= width(d)``; key
    frames below ``sink_frames`` are fully visible."""
    from vidattn.patterns.radial import radial_tables

    T, H, W = (int(g) for g in grid)
    n = H * W
    widths, keeps = radial_tables(T, n, pattern.block_size, float(pattern.decay_factor), pattern.dense_near_frames)

    def band(w):
        w = int(math.floor(w))
        return n * n if w >= n - 1 else n + 2 * (w * n - w * (w + 1) // 2)

    sink = min(int(pattern.sink_frames), T)
    total = 0
    for i in range(T):
        for j in range(T):
            d = abs(i - j)
            total += n * n if j < sink else (band(widths[d]) if keeps[d] else 0)
    return float(total) / float((T * n) ** 2)


def _axis_sizes(n: int):
    return sorted({k for k in range(1, n + 1, 2)} | {n})


def fit_neighborhood(sparsity: float, grid: Grid, cls=None) -> Dict[str, Any]:
    """Kernel whose window holds ``(1 - sparsity)`` of the grid (NATTEN windows are clamped inside
    the grid, so the density is exactly ``prod(k_i) / prod(n_i)``), every axis <= the grid, with
    axes shrunk in proportion (odd sizes, or the full axis)."""
    target = 1.0 - float(sparsity)
    best, best_score = None, None
    sizes = [_axis_sizes(int(n)) for n in grid]
    import itertools

    for ks in itertools.product(*sizes):
        fr = [k / n for k, n in zip(ks, grid)]
        dens = math.prod(fr)
        spread = max(fr) / min(fr)
        score = abs(math.log(dens / target)) + 0.15 * math.log(spread)
        if best_score is None or score < best_score:
            best, best_score = ks, score
    return dict(kernel_size=tuple(int(k) for k in best), block_size=fit_block_size(grid, 4, (64, 32, 16)))


def fit_radial(sparsity: float, grid: Grid, cls=None) -> Dict[str, Any]:
    """``decay_factor`` (scanned geometrically) whose measured token density is closest to
    ``1 - sparsity`` on the grid; no sink frames, block size fitted."""
    import vidattn

    cls = cls or vidattn.Radial
    target = 1.0 - float(sparsity)
    top = fit_block_size(grid, 8, (128, 64, 32, 16))
    best, best_err = None, None
    for block in [b for b in (128, 64, 32, 16) if b <= top]:  # the band never falls below one block
        for i in range(-14, 7):
            kw = dict(decay_factor=float(2.0 ** (i / 2)), block_size=block, sink_frames=0)
            try:
                d = radial_density(cls(**kw), grid)
            except ValueError:
                continue
            err = abs(math.log(max(d, 1e-6) / target))
            if best_err is None or err < best_err - 1e-3:
                best, best_err = kw, err
    return best


def fit_grid(sparsity: float, grid: Grid, cls=None) -> Dict[str, Any]:
    """PermutedGrid: ``recall`` from the sparsity (0.5 -> 0.95, 0.75 -> 0.9, 0.9 -> 0.8, linear in
    between; the achieved density is data-dependent), block size fitted."""
    s = float(sparsity)
    recall = float(min(0.99, max(0.5, 0.95 - (s - 0.5) * 0.2 if s <= 0.75 else 0.9 - (s - 0.75) * (0.1 / 0.15))))
    return dict(recall=round(recall, 4), block_size=fit_block_size(grid, 8, (128, 64, 32, 16)))


def fit_keep_fraction(sparsity: float, grid: Grid, cls=None) -> Dict[str, Any]:
    """Block-selection families: keep ``1 - sparsity`` of the key blocks, block size fitted."""
    return dict(keep=round(1.0 - float(sparsity), 4), block_size=fit_block_size(grid, 8, (128, 64, 32, 16)))


_KEEP_FIELDS = ("keep", "density", "keep_ratio", "keep_fraction", "topk_ratio", "top_k_ratio")


def fit_generic(sparsity: float, grid: Grid, cls=None) -> Dict[str, Any]:
    """Any registry pattern: block size fitted and a keep/density-like field set to ``1 - sparsity``
    when the pattern dataclass has one (a ``sparsity`` field gets the sparsity itself)."""
    fields = {f.name for f in dataclasses.fields(cls)} if cls is not None and dataclasses.is_dataclass(cls) else set()
    out: Dict[str, Any] = {}
    if "block_size" in fields:
        out["block_size"] = fit_block_size(grid, 8, (128, 64, 32, 16))
    for f in _KEEP_FIELDS:
        if f in fields:
            out[f] = round(1.0 - float(sparsity), 4)
            break
    else:
        if "sparsity" in fields:
            out["sparsity"] = float(sparsity)
    return out


def _levels(table: Dict[float, Dict[str, Any]], sparsity: float) -> Dict[str, Any]:
    """The entry of ``table`` (sparsity -> kwargs) nearest to ``sparsity``."""
    return dict(table[min(table, key=lambda lv: abs(lv - float(sparsity)))])


# Clustered (Sparse VideoGen 2): top_p / block size are the knobs; the density reached depends on
# the content (measured on structured inputs at 8 x 16 x 16: 0.46 / 0.24 / 0.09); reported as run
_CLUSTERED_LEVELS = {0.5: dict(top_p=0.9, min_fraction=0.1, block_size=32),
                     0.75: dict(top_p=0.8, min_fraction=0.1, block_size=16),
                     0.9: dict(top_p=0.5, min_fraction=0.02, block_size=16)}


def fit_clustered(sparsity: float, grid: Grid, cls=None) -> Dict[str, Any]:
    """Clustered: the ``top_p`` / ``min_fraction`` / block size of the nearest level (50 / 75 / 90%)."""
    return _levels(_CLUSTERED_LEVELS, sparsity)


def _init_fields(p) -> Dict[str, Any]:
    return {f.name: getattr(p, f.name) for f in dataclasses.fields(p) if f.init}


def fit_radial_authors(sparsity: float, grid: Grid, cls=None) -> Dict[str, Any]:
    """``Radial.from_authors("wan", block_size=64)`` with the ``decay_factor`` whose measured token
    density on ``grid`` is closest to ``1 - sparsity`` (their mask at their settings otherwise)."""
    import vidattn

    target, best, best_err = 1.0 - float(sparsity), None, None
    for i in range(-12, 7):
        p = vidattn.Radial.from_authors("wan", decay_factor=float(2.0 ** (i / 2)), block_size=64)
        try:
            d = token_density(p, grid)
        except ValueError:
            continue
        err = abs(math.log(max(d, 1e-6) / target))
        if best_err is None or err < best_err - 1e-3:
            best, best_err = _init_fields(p), err
    return best


def fit_rectified_authors(sparsity: float, grid: Grid, cls=None) -> Dict[str, Any]:
    """``RectifiedSparse.from_authors("wan21", drop_rate=sparsity)`` (the authors' drop rate is the
    knob), block size fitted when the grid has fewer than 8 blocks of 128."""
    import vidattn

    kw = _init_fields(vidattn.RectifiedSparse.from_authors("wan21", drop_rate=float(sparsity)))
    kw["block_size"] = min(int(kw["block_size"]), fit_block_size(grid, 8, (128, 64, 32, 16)))
    return kw


def fit_svg(sparsity: float, grid: Grid, cls=None) -> Dict[str, Any]:
    """Sparse VideoGen 1: their ``sparsity`` is the kept fraction, so ``1 - sparsity``; block size fitted."""
    return dict(sparsity=round(1.0 - float(sparsity), 4), block_size=fit_block_size(grid, 8, (128, 64, 32, 16)))


register_preset("neighborhood", fit=fit_neighborhood)
register_preset("radial", fit=fit_radial)
register_preset("grid", fit=fit_grid)
register_preset("rectified", fit=fit_keep_fraction)
register_preset("clustered", fit=fit_clustered)
register_preset("radial_authors", "radial", fit_radial_authors)
register_preset("rectified_authors", "rectified", fit_rectified_authors)
register_preset("svg", fit=fit_svg)


def preset_names() -> Tuple[str, ...]:
    """Every usable name: the table's and the pattern registry's (except ``dense``)."""
    from vidattn.config import PATTERNS

    return tuple(dict.fromkeys(list(PRESETS) + [n for n in PATTERNS if n != "dense"]))


def _resolve(name: str) -> Preset:
    from vidattn.config import PATTERNS

    if name in PRESETS:
        return PRESETS[name]
    if name in PATTERNS and name != "dense":
        return Preset(name, fit_generic)
    raise ValueError(f"unknown preset (pattern family) {name!r}; known: {', '.join(preset_names())}")


def fit_kwargs(name: str, sparsity: float, grid: Grid) -> Tuple[str, Dict[str, Any]]:
    """``(registry pattern name, kwargs)`` of preset ``name`` at ``sparsity`` on ``grid``."""
    from vidattn.config import pattern_class

    if not 0.0 < float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in (0, 1), got {sparsity!r}")
    grid = tuple(int(g) for g in grid)
    if not grid or min(grid) < 1:
        raise ValueError(f"grid must be a tuple of positive ints like (T, H, W), got {grid!r}")
    pr = _resolve(name)
    cls = pattern_class(pr.pattern)
    return pr.pattern, dict(pr.fit(float(sparsity), grid, cls))


def fit_pattern(name: str, sparsity: float, grid: Grid, **overrides):
    """The pattern of preset ``name`` fitted to ``sparsity`` on the token ``grid`` (e.g.
    ``(T, H, W)``); ``overrides`` replace fitted fields."""
    from vidattn.config import pattern_class

    pat, kw = fit_kwargs(name, sparsity, grid)
    kw.update(overrides)
    return pattern_class(pat)(**kw)
