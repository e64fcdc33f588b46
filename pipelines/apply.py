"""One-call ``vidattn.apply`` / ``vidattn.remove`` for diffusers pipelines and transformers.

Modeled on diffusers' hook API (``apply_first_block_cache(module, config)``): a config dataclass,
an idempotent apply that replaces (never stacks) and a remove that puts back the exact original
processor objects, so outputs after ``remove`` are bit-identical to a never-touched model.

What ``apply`` does on each transformer (``pipe.transformer``, and ``pipe.transformer_2`` when
present):

1. registers the ``"vidattn"`` diffusers attention backend (once per process) and installs a
   :class:`~vidattn.pipelines.hooks.ModelState`: a forward pre-hook that records the latent token
   grid and text position each call, and a stateful diffusers ``ModelHook`` that reads the
   denoising step from the pipeline's ``cache_context``;
2. wraps the processor of every self-attention module over video/image tokens in a
   :class:`~vidattn.pipelines.processors.SparseAttnProcessor` whose inner (original) processor
   dispatches to the ``"vidattn"`` backend (cross-attention and text-only attention keep their
   original processor, untouched);
3. returns a :class:`SparseAttentionHandle` with the stats (sparse/dense call counts, recorded
   layout, plan densities).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

from vidattn.attention import BACKENDS
from vidattn.patterns.base import Pattern

from .families import UnsupportedModelError
from .hooks import AttentionStats, attention_modules, model_state
from .layout_discovery import SUPPORTED_FAMILIES, family_of
from .processors import SparseAttnProcessor

__all__ = ["SparseAttentionConfig", "SparseAttentionHandle", "apply", "remove", "transformers_of"]

_HANDLE_ATTR = "_vidattn_handle"


@dataclass(frozen=True)
class SparseAttentionConfig:
    """What to sparsify and when.

    Args:
        pattern: a vidattn pattern (``Neighborhood``, ``Radial``, ``PermutedGrid``, ``RectifiedSparse``).
        dense_steps: the first ``dense_steps`` denoising steps of every pipeline call run dense
            (a step = one timestep value; CFG's 1 or 2 forwards per step count once).
        dense_layers: self-attention layer indices kept dense (index into ``handle.layer_names``).
        heads: query-head indices to sparsify (the others stay dense); None = all heads.
        backend: ``"auto" | "reference" | "flex" | "triton"``.
        layer_patterns: per-layer override of ``pattern``: ``{layer index: pattern or None}``
            (None = that layer runs dense). Layers not listed use ``pattern``.
        layer_heads: per-layer override of ``heads``: ``{layer index: head indices or None}``.
    """

    pattern: Pattern
    dense_steps: int = 0
    dense_layers: Tuple[int, ...] = ()
    heads: Optional[Tuple[int, ...]] = None
    backend: str = "auto"
    layer_patterns: Mapping[int, Optional[Pattern]] = field(default_factory=dict)
    layer_heads: Mapping[int, Optional[Tuple[int, ...]]] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"pattern must be a vidattn pattern (Neighborhood, Radial, ...), got "
                            f"{type(self.pattern).__name__}")
        if isinstance(self.dense_steps, bool) or not isinstance(self.dense_steps, int) or self.dense_steps < 0:
            raise ValueError(f"dense_steps must be an int >= 0, got {self.dense_steps!r}")
        try:
            layers = tuple(int(i) for i in self.dense_layers)
        except TypeError:
            raise TypeError(f"dense_layers must be an iterable of ints, got {self.dense_layers!r}") from None
        object.__setattr__(self, "dense_layers", layers)
        if self.heads is not None:
            try:
                heads = tuple(int(h) for h in self.heads)
            except TypeError:
                raise TypeError(f"heads must be None or an iterable of ints, got {self.heads!r}") from None
            if not heads or min(heads) < 0:
                raise ValueError(f"heads must be a non-empty list of head indices >= 0, got {self.heads!r}")
            object.__setattr__(self, "heads", heads)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.layer_patterns, Mapping):
            raise TypeError(f"layer_patterns must be a dict {{layer: pattern or None}}, got "
                            f"{type(self.layer_patterns).__name__}")
        lp = {}
        for layer, pat in self.layer_patterns.items():
            if pat is not None and not isinstance(pat, Pattern):
                raise TypeError(f"layer_patterns[{layer!r}] must be a vidattn pattern or None, got {type(pat).__name__}")
            lp[int(layer)] = pat
        object.__setattr__(self, "layer_patterns", lp)
        if not isinstance(self.layer_heads, Mapping):
            raise TypeError(f"layer_heads must be a dict {{layer: head indices or None}}, got "
                            f"{type(self.layer_heads).__name__}")
        lh = {}
        for layer, hs in self.layer_heads.items():
            if hs is not None:
                hs = tuple(int(h) for h in hs)
                if not hs or min(hs) < 0:
                    raise ValueError(f"layer_heads[{layer!r}] must be None or a non-empty list of head indices >= 0")
            lh[int(layer)] = hs
        object.__setattr__(self, "layer_heads", lh)

    def pattern_for(self, layer: int) -> Optional[Pattern]:
        """The pattern of self-attention layer ``layer`` (None: the layer runs dense)."""
        if layer in self.dense_layers:
            return None
        return self.layer_patterns.get(layer, self.pattern)

    def heads_for(self, layer: int) -> Optional[Tuple[int, ...]]:
        """Query heads sparsified in ``layer`` (None: all heads)."""
        return self.layer_heads.get(layer, self.heads)

    def patterns(self) -> List[Pattern]:
        """Every distinct pattern the config can run (the default and the per-layer ones)."""
        out = [self.pattern] + [p for p in self.layer_patterns.values() if p is not None]
        return list({id(p): p for p in out}.values())


@dataclass
class SparseAttentionHandle:
    """Returned by :func:`apply`. ``stats`` is live (updated as the pipeline runs).

    Attributes:
        config: the applied config.
        transformers: the patched transformer modules.
        layer_names: per transformer, the self-attention module names in layer-index order.
    """

    config: SparseAttentionConfig
    transformers: List = field(default_factory=list)
    layer_names: List[List[str]] = field(default_factory=list)
    _originals: List[Dict[str, object]] = field(default_factory=list, repr=False)
    _states: List = field(default_factory=list, repr=False)

    @property
    def stats(self) -> AttentionStats:
        """Stats of the first transformer (the only one for most pipelines)."""
        return self._states[0].stats

    @property
    def all_stats(self) -> List[AttentionStats]:
        """Stats per patched transformer."""
        return [s.stats for s in self._states]

    @property
    def sparse_calls(self) -> int:
        """Self-attention calls run sparse, summed over transformers."""
        return sum(s.stats.sparse_calls for s in self._states)

    @property
    def dense_calls(self) -> int:
        """Self-attention calls kept dense (schedule or unmatched sequence), summed over transformers."""
        return sum(s.stats.dense_calls for s in self._states)

    @property
    def layout(self):
        """The last :class:`~vidattn.TokenLayout` attended over (first transformer), or None."""
        return self._states[0].stats.layout

    @property
    def grid(self):
        """Latent token grid recorded by the pre-hook on the last call (first transformer)."""
        return self._states[0].stats.grid

    @property
    def densities(self) -> Dict[int, float]:
        """Layer -> block density of the last plan (first transformer)."""
        return {k: float(v) for k, v in self._states[0].stats.densities.items()}

    @property
    def token_densities(self) -> Dict[int, float]:
        """Layer -> token density (fraction of allowed (query, key) pairs) of the last plan."""
        return {k: float(v) for k, v in self._states[0].stats.token_densities.items()}

    def reset_stats(self) -> None:
        """Zero the call counters and densities."""
        for s in self._states:
            s.stats.reset()

    def reset_steps(self) -> None:
        """Count denoising steps from 0 again (normally automatic per pipeline call)."""
        for s in self._states:
            s.reset_steps()

    def remove(self) -> None:
        """Same as ``vidattn.remove`` on the patched transformers."""
        for t in list(self.transformers):
            _remove_one(t)


def transformers_of(obj) -> List:
    """The diffusers transformer(s) of a pipeline, or ``[obj]`` for a transformer. Raises
    ``TypeError`` for anything else."""
    try:
        from diffusers import DiffusionPipeline, ModelMixin
    except ImportError as e:  # pragma: no cover
        raise TypeError(f"vidattn.apply needs diffusers installed: {e}") from None
    if isinstance(obj, ModelMixin):
        return [obj]
    if isinstance(obj, DiffusionPipeline):
        out = [getattr(obj, n) for n in ("transformer", "transformer_2") if isinstance(getattr(obj, n, None), ModelMixin)]
        if not out:
            raise TypeError(f"{type(obj).__name__} has no diffusers transformer (pipe.transformer); vidattn "
                            f"supports transformer-based pipelines of {SUPPORTED_FAMILIES}")
        return out
    raise TypeError(f"vidattn.apply expects a diffusers pipeline or transformer (ModelMixin), got "
                    f"{type(obj).__module__}.{type(obj).__name__}")


def _as_config(pattern_or_config, dense_steps, dense_layers, heads, backend) -> SparseAttentionConfig:
    if isinstance(pattern_or_config, SparseAttentionConfig):
        return pattern_or_config
    if isinstance(pattern_or_config, Pattern):
        return SparseAttentionConfig(pattern_or_config, dense_steps=dense_steps, dense_layers=tuple(dense_layers),
                                     heads=heads, backend=backend)
    raise TypeError(f"pattern_or_config must be a vidattn pattern or SparseAttentionConfig, got "
                    f"{type(pattern_or_config).__name__}")


def apply(pipe_or_transformer, pattern_or_config, *, dense_steps: int = 0, dense_layers: Iterable[int] = (),
          heads: Optional[Iterable[int]] = None, backend: str = "auto") -> SparseAttentionHandle:
    """Make the self-attention of a diffusers pipeline/transformer sparse.

    Args:
        pipe_or_transformer: a ``DiffusionPipeline`` with ``.transformer`` (Wan, HunyuanVideo,
            CogVideoX, LTX-Video, FLUX) or the transformer itself.
        pattern_or_config: a vidattn pattern or a :class:`SparseAttentionConfig` (then the keyword
            arguments are ignored).
        dense_steps, dense_layers, heads, backend: see :class:`SparseAttentionConfig`.
    Returns:
        :class:`SparseAttentionHandle`. Applying again replaces the previous application.
    Raises:
        TypeError: not a diffusers pipeline/transformer, or a transformer without layout discovery.
        ValueError: the pattern cannot serve the model's grid rank (e.g. a 3-D kernel on FLUX);
            grid-size errors (kernel larger than the latent grid) are raised at the first call,
            before any attention runs.
    """
    cfg = _as_config(pattern_or_config, dense_steps, dense_layers, heads, backend)
    models = transformers_of(pipe_or_transformer)
    for m in models:
        if family_of(m) is None:  # Mochi raises UnsupportedModelError (a TypeError) here
            raise UnsupportedModelError(f"vidattn has no token-layout discovery for {type(m).__name__}; supported transformer "
                            f"families: {SUPPORTED_FAMILIES}")
    for m in models:  # validate before touching anything
        _remove_one(m)
        st = model_state(m)
        try:
            for pat in cfg.patterns():
                st.add_pattern(pat)
            bad = [i for i in set(cfg.dense_layers) | set(cfg.layer_patterns) | set(cfg.layer_heads)
                   if not 0 <= i < len(st.layer_names)]
            if bad:
                raise ValueError(f"layers {sorted(bad)} (dense_layers / layer_patterns / layer_heads) out of range: "
                                 f"{type(m).__name__} has "
                                 f"{len(st.layer_names)} self-attention layers (0..{len(st.layer_names) - 1})")
        except Exception:
            st.detach(m)
            raise
    handle = SparseAttentionHandle(cfg)
    for m in models:
        st = model_state(m)
        mods = attention_modules(m)
        originals = {}
        for name in st.layer_names:
            attn = mods[name]
            orig = attn.processor
            originals[name] = orig
            layer = st.layer_of[id(attn)]
            pat = cfg.pattern_for(layer)
            proc = SparseAttnProcessor(cfg.pattern if pat is None else pat, inner=orig, backend=cfg.backend,
                                       dense_steps=cfg.dense_steps, dense_layers=(layer,) if pat is None else (),
                                       heads=cfg.heads_for(layer), layer=layer)
            attn.set_processor(proc)
        for attn in mods.values():
            attn.__dict__["_vidattn_owner"] = weakref.ref(m)
        handle.transformers.append(m)
        handle.layer_names.append(list(st.layer_names))
        handle._originals.append(originals)
        handle._states.append(st)
        m.__dict__[_HANDLE_ATTR] = (handle, originals)
    return handle


def _remove_one(model) -> bool:
    entry = model.__dict__.pop(_HANDLE_ATTR, None)
    removed = False
    if entry is not None:
        _, originals = entry
        mods = attention_modules(model)
        for name, orig in originals.items():
            if name in mods:
                cur = mods[name].processor
                if isinstance(cur, SparseAttnProcessor) and cur.inner is orig:
                    cur.release()
                mods[name].set_processor(orig)
        removed = True
    st = model_state(model, create=False)
    if st is not None:
        st.detach(model)
    for attn in attention_modules(model).values():
        attn.__dict__.pop("_vidattn_owner", None)
    return removed


def remove(pipe_or_transformer) -> bool:
    """Undo :func:`apply`: the original processor objects go back and the pre-hook is removed.

    Returns True if something was applied. Processors installed by hand with
    ``set_attn_processor`` are not touched (only their layout hook is removed).
    """
    return any([_remove_one(m) for m in transformers_of(pipe_or_transformer)])
