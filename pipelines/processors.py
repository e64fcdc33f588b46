"""Sparse attention processors for diffusers transformers (Wan, HunyuanVideo, CogVideoX, LTX-Video,
FLUX, and any processor that calls ``dispatch_attention_fn`` on ``[B, S, H, D]``).

How it works: :class:`SparseAttnProcessor` wraps the model's own processor (the object that was
installed, or the family default when installed by hand). For a call that should go sparse it runs
the original processor's ``__call__`` *code unchanged*, but through a copy of the function whose
globals map ``dispatch_attention_fn`` (and ``F`` for processors that call
``F.scaled_dot_product_attention`` on ``[B, H, S, D]``, like CogVideoX) to vidattn interceptors. So
QK norms, rotary embeddings, text masks and output projections are the original code; only the
attention call changes. Nothing module-level is patched. The interceptor runs sparse attention only
for self-attention whose length equals the recorded layout; everything else goes to the original
function.

Layout: a forward pre-hook on the transformer (:class:`ModelState`, installed by
``vidattn.apply`` or lazily by a hand-installed processor on its first call) records the latent
grid; the text-token count is ``S - prod(grid)`` at attention time.
"""

from __future__ import annotations

import inspect
import sys
import threading
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as _F

from vidattn.attention import BACKENDS, run_plan
from vidattn.layout import TokenLayout
from vidattn.patterns.base import Pattern

from .layout_discovery import (SUPPORTED_FAMILIES, LayoutRecord, call_arguments, family_of, grid_rank, layout_from_call,
                               layout_from_frame)

__all__ = ["SparseAttnProcessor", "ModelState", "AttentionStats", "model_state", "is_self_attention",
           "attention_modules"]

_STATE_ATTR = "_vidattn_state"
_tls = threading.local()


# =============================================================================== stats
@dataclass
class AttentionStats:
    """Counters read by the CLI / quality harness.

    sparse_calls: self-attention calls executed with the sparse pattern.
    dense_calls: self-attention calls kept dense by the schedule (``dense_steps`` /
        ``dense_layers``) or because the sequence did not match the layout.
    layout: the last :class:`TokenLayout` attended over (grid + text prefix/suffix).
    grid: latent grid recorded by the pre-hook on the last transformer call.
    densities: layer index -> block density of the last plan run in that layer (fraction of
        (query block, key block) tiles computed).
    token_densities: layer index -> token density of that plan (fraction of (query, key) pairs).
    steps_seen: denoising steps seen since the last reset.
    """

    sparse_calls: int = 0
    dense_calls: int = 0
    layout: Optional[TokenLayout] = None
    grid: Optional[Tuple[int, ...]] = None
    densities: Dict[int, float] = field(default_factory=dict)
    token_densities: Dict[int, float] = field(default_factory=dict)
    steps_seen: int = 0

    def reset(self) -> None:
        """Zero the counters (layout / grid kept)."""
        self.sparse_calls = self.dense_calls = 0
        self.densities.clear()
        self.token_densities.clear()

    @property
    def mean_density(self) -> Optional[float]:
        """Mean block density over layers of the last plans, None before any sparse call."""
        if not self.densities:
            return None
        return sum(float(d) for d in self.densities.values()) / len(self.densities)


# =============================================================================== model state
def is_self_attention(name: str, module) -> bool:
    """True for attention modules over video/image tokens (not cross-attention, not text refiners)."""
    if getattr(module, "is_cross_attention", False):
        return False
    last = name.rsplit(".", 1)[-1]
    if last in ("attn2", "cross_attn", "attn_cross") or "token_refiner" in name or "context_embedder" in name:
        return False
    if getattr(module, "cross_attention_dim_head", None) is not None:  # Wan cross-attention
        return False
    return True


def attention_modules(model) -> Dict[str, torch.nn.Module]:
    """name -> module for every sub-module carrying a diffusers attention ``processor``."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "processor") and hasattr(m, "set_processor")}


class ModelState:
    """Per-transformer state: layout pre-hook, step counter, layer indices, stats.

    Stored on the model (``model._vidattn_state``). ``step`` counts denoising steps: a transformer
    call with a new ``timestep`` value advances it (CFG's second forward at the same timestep does
    not); a timestep larger than the previous one (a new pipeline call) resets it to 0.
    """

    def __init__(self, model):
        self._model = weakref.ref(model)
        self.family = family_of(model)
        self.rank = grid_rank(model)
        self.record: Optional[LayoutRecord] = None
        self.step = 0
        self._last_t: Optional[float] = None
        self.stats = AttentionStats()
        self._layouts: Dict[tuple, Optional[TokenLayout]] = {}
        self.patterns: Dict[int, Pattern] = {}  # validated against each new grid
        names = [n for n, m in attention_modules(model).items() if is_self_attention(n, m)]
        mods = attention_modules(model)
        self.layer_of: Dict[int, int] = {id(mods[n]): i for i, n in enumerate(names)}
        self.layer_names = names
        self._hook = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    # ------------------------------------------------------------------ hook
    @torch.compiler.disable
    def _pre_hook(self, module, args, kwargs):
        # runs eagerly (model boundary, once per transformer call), never inside attention
        bound = call_arguments(module, args, kwargs)
        rec = layout_from_call(module, (), bound)
        self._set_record(rec)
        self._advance(bound.get("timestep"))
        n = 1
        for g in rec.grid:
            n *= g
        ehs = bound.get("encoder_hidden_states")
        self.layout_for(n + rec.extra_suffix)
        if rec.text is not None and isinstance(ehs, torch.Tensor) and ehs.dim() == 3:
            self.layout_for(n + rec.extra_suffix + int(ehs.shape[1]))
        return None

    def _set_record(self, rec: LayoutRecord) -> None:
        if rec != self.record:
            grid_layout = TokenLayout(rec.grid)
            for p in list(self.patterns.values()):
                p.validate(grid_layout)  # e.g. kernel larger than the grid: clear ValueError, no compute yet
        self.record = rec
        self.stats.grid = rec.grid

    def _advance(self, t) -> None:
        if t is None:
            return
        if isinstance(t, torch.Tensor):
            t = t.detach().reshape(-1)[:1].float().cpu().item() if t.numel() else None
        if t is None:
            return
        t = float(t)
        if self._last_t is None or t > self._last_t:
            self.step = 0
            self.stats.steps_seen = 1
        elif t != self._last_t:
            self.step += 1
            self.stats.steps_seen += 1
        self._last_t = t

    def layout_for(self, S: int) -> Optional[TokenLayout]:
        """TokenLayout of a self-attention sequence of ``S`` tokens under the current record
        (text tokens = ``S - prod(grid)``), None if ``S`` does not fit. Cached, so compiled
        graphs see a constant object."""
        rec = self.record
        if rec is None:
            return None
        key = (rec, S)
        lay = self._layouts.get(key)
        if lay is None and key not in self._layouts:
            lay = _layout_for(rec, S)
            if len(self._layouts) > 64:
                self._layouts.clear()
            self._layouts[key] = lay
        return lay

    def reset_steps(self) -> None:
        """Start counting denoising steps from 0 at the next transformer call."""
        self._last_t = None
        self.step = 0

    def add_pattern(self, pattern: Pattern) -> None:
        """Check ``pattern``'s grid rank now (and its sizes on every new grid)."""
        if self.rank is not None:
            _check_rank(pattern, self.rank, self.family)
        self.patterns[id(pattern)] = pattern
        if self.record is not None:
            pattern.validate(TokenLayout(self.record.grid))

    def detach(self, model) -> None:
        """Remove the pre-hook and the state from ``model``."""
        self._hook.remove()
        if model.__dict__.get(_STATE_ATTR) is self:
            del model.__dict__[_STATE_ATTR]


def _check_rank(pattern: Pattern, rank: int, family) -> None:
    big = TokenLayout((4096,) * rank) if rank < 3 else TokenLayout((1024, 1024, 1024))
    if getattr(pattern, "needs_frames", False) and rank != 3:
        raise ValueError(f"{type(pattern).__name__} needs a (T, H, W) video grid but {family} has a {rank}-D grid")
    try:
        pattern.validate(big)
    except ValueError as e:
        raise ValueError(f"{type(pattern).__name__} cannot serve the {rank}-D token grid of {family}: {e}") from None
    ks = getattr(pattern, "kernel_size", None)
    if isinstance(ks, (tuple, list)) and len(ks) != rank:
        raise ValueError(f"kernel_size {tuple(ks)} has {len(ks)} axes but {family} has a {rank}-D token grid")


def model_state(model, create: bool = True) -> Optional[ModelState]:
    """The :class:`ModelState` of ``model`` (created with its pre-hook if missing and ``create``)."""
    st = model.__dict__.get(_STATE_ATTR)
    if st is None and create:
        st = ModelState(model)
        model.__dict__[_STATE_ATTR] = st
    return st


def _find_owner(attn):
    """Walk the Python stack for the running diffusers transformer forward that owns ``attn``."""
    f = sys._getframe(2)
    while f is not None:
        obj = f.f_locals.get("self")
        if obj is not None and family_of(obj) is not None and f.f_code.co_name == "forward":
            if any(m is attn for m in obj.modules()):
                return obj, dict(f.f_locals)
        f = f.f_back
    return None, None


# =============================================================================== interception
_orig_dispatch = None


def _original_dispatch():
    global _orig_dispatch
    if _orig_dispatch is None:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        _orig_dispatch = dispatch_attention_fn
    return _orig_dispatch


def _intercept_dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False, backend=None, parallel_config=None, **extra):
    """Stand-in for diffusers ``dispatch_attention_fn`` (``[B, S, H, D]`` in and out)."""
    ctx = getattr(_tls, "ctx", None)
    if ctx is not None and ctx.accepts(query, key, attn_mask, dropout_p, is_causal, parallel_config):
        return ctx.run(query, key, value, attn_mask, scale)
    kw = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
              backend=backend, parallel_config=parallel_config, **extra)
    return _original_dispatch()(query, key, value, **kw)


class _FunctionalProxy(types.ModuleType):
    """``torch.nn.functional`` with ``scaled_dot_product_attention`` ([B, H, S, D]) intercepted."""

    def __getattr__(self, name):
        return getattr(_F, name)

    @staticmethod
    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                     **kw):
        ctx = getattr(_tls, "ctx", None)
        if ctx is not None and query.dim() == 4 and not kw and ctx.accepts(
                query.transpose(1, 2), key.transpose(1, 2), attn_mask, dropout_p, is_causal, None):
            out = ctx.run(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask, scale)
            return out.transpose(1, 2)
        return _F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                               is_causal=is_causal, scale=scale, **kw)


_F_PROXY = _FunctionalProxy("vidattn_functional_proxy")
_rebound: Dict[type, Optional[types.FunctionType]] = {}


def rebound_call(proc_cls: type) -> Optional[types.FunctionType]:
    """``proc_cls.__call__`` with its attention call routed to vidattn, or None if the processor
    calls neither ``dispatch_attention_fn`` nor ``F.scaled_dot_product_attention`` itself."""
    if proc_cls in _rebound:
        return _rebound[proc_cls]
    fn = getattr(proc_cls, "__call__", None)
    new = None
    if isinstance(fn, types.FunctionType):
        names = fn.__code__.co_names
        g = dict(fn.__globals__)
        hit = False
        if "dispatch_attention_fn" in names:
            g["dispatch_attention_fn"] = _intercept_dispatch
            hit = True
        if "scaled_dot_product_attention" in names and "F" in names and isinstance(g.get("F"), types.ModuleType):
            g["F"] = _F_PROXY
            hit = True
        if hit:
            new = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
            new.__kwdefaults__ = fn.__kwdefaults__
    _rebound[proc_cls] = new
    return new


_FAMILY_DEFAULT = {
    "hunyuan_video": ("diffusers.models.transformers.transformer_hunyuan_video", "HunyuanVideoAttnProcessor2_0"),
    "cogvideox": ("diffusers.models.attention_processor", "CogVideoXAttnProcessor2_0"),
}


def _layout_for(rec: LayoutRecord, S: int) -> Optional[TokenLayout]:
    n = 1
    for g in rec.grid:
        n *= g
    extra = S - n - rec.extra_suffix
    if extra < 0 or (extra > 0 and rec.text is None):
        return None
    pre, suf = (extra, rec.extra_suffix) if rec.text == "prefix" else (0, extra + rec.extra_suffix)
    return TokenLayout(rec.grid, prefix=pre, suffix=suf)


class _CallCtx:
    """One sparse call: pattern + layout record, checks and runs the attention."""

    __slots__ = ("proc", "state", "layer", "ran")

    def __init__(self, proc, state, layer):
        self.proc, self.state, self.layer, self.ran = proc, state, layer, False

    def layout_for(self, S: int) -> Optional[TokenLayout]:
        return self.state.layout_for(S)


    def accepts(self, q, k, mask, dropout_p, is_causal, parallel_config) -> bool:
        if self.ran or self.state.record is None or is_causal or dropout_p or parallel_config is not None:
            return False
        if q.dim() != 4 or q.shape[1] != k.shape[1]:
            return False
        return self.layout_for(q.shape[1]) is not None

    def run(self, q, k, v, mask, scale):
        self.ran = True
        layout = self.layout_for(q.shape[1])
        return self.proc._sparse(q, k, v, layout, mask, scale, self.state, self.layer)


# =============================================================================== processor
class SparseAttnProcessor:
    """Diffusers attention processor running ``pattern`` on self-attention over video/image tokens.

    Args:
        pattern: a vidattn pattern (``Neighborhood``, ``Radial``, ``PermutedGrid``, ``RectifiedSparse``, ...).
        inner: the processor to wrap (its code computes QKV, norms, RoPE, output projections); None
            = the attention module's default processor (when installed by hand with
            ``transformer.set_attn_processor(SparseAttnProcessor(pattern))``).
        backend: ``"auto" | "reference" | "flex" | "triton"``.
        dense_steps: the first ``dense_steps`` denoising steps of each pipeline call run dense.
        dense_layers: self-attention layer indices (order of ``ModelState.layer_names``) that run dense.
        heads: query-head indices to sparsify (others dense); None = all heads.

    Called like the wrapped processor: ``proc(attn, hidden_states, *args, **kwargs)``; tensors
    keep the original processor's shapes and dtypes (hidden_states ``[B, S, C]``). Attention inside
    is ``[B, S, H, D]``.
    """

    def __init__(self, pattern: Pattern, inner=None, *, backend: str = "auto", dense_steps: int = 0,
                 dense_layers: Iterable[int] = (), heads: Optional[Iterable[int]] = None, layer: Optional[int] = None):
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a vidattn pattern (Neighborhood, Radial, ...), got {type(pattern).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(dense_steps, bool) or not isinstance(dense_steps, int) or dense_steps < 0:
            raise ValueError(f"dense_steps must be an int >= 0, got {dense_steps!r}")
        self.pattern = pattern
        self.inner = inner
        self.backend = backend
        self.dense_steps = dense_steps
        self.dense_layers = frozenset(int(i) for i in dense_layers)
        self.heads = None if heads is None else tuple(sorted(int(h) for h in heads))
        self.layer = layer
        self._inners: Dict[int, object] = {}
        # diffusers' Attention.forward filters cross_attention_kwargs by
        # inspect.signature(processor.__call__): expose the wrapped processor's parameters
        if type(self) is SparseAttnProcessor:
            self.__class__ = _signature_subclass(None if inner is None else type(inner))

    # diffusers calls processors positionally: (attn, hidden_states, encoder_hidden_states, ...)
    def __call__(self, attn, hidden_states, *args, **kwargs):
        state = self._state_for(attn)
        inner = self._inner_for(attn)
        if kwargs:
            kwargs = _filter_kwargs(type(inner), kwargs)
        layer = self.layer if self.layer is not None else (state.layer_of.get(id(attn)) if state else None)
        fn = rebound_call(type(inner))
        if state is None or layer is None or fn is None:
            return inner(attn, hidden_states, *args, **kwargs)
        if state.step < self.dense_steps or layer in self.dense_layers:
            if not torch.compiler.is_compiling():
                state.stats.dense_calls += 1
            return inner(attn, hidden_states, *args, **kwargs)
        ctx = _CallCtx(self, state, layer)
        prev = getattr(_tls, "ctx", None)
        _tls.ctx = ctx
        try:
            out = fn(inner, attn, hidden_states, *args, **kwargs)
        finally:
            _tls.ctx = prev
        if not ctx.ran and not torch.compiler.is_compiling():
            state.stats.dense_calls += 1
        return out

    # ------------------------------------------------------------------ helpers
    def _inner_for(self, attn):
        if self.inner is not None:
            return self.inner
        inner = self._inners.get(id(attn))
        if inner is None:
            inner = _default_for(attn, attn.__dict__.get("_vidattn_family"), attn.__dict__.get("_vidattn_self", True))
            self._inners[id(attn)] = inner
        return inner

    def _state_for(self, attn) -> Optional[ModelState]:
        ref = attn.__dict__.get("_vidattn_owner")
        model = ref() if ref is not None else None
        if model is None:
            model, loc = _find_owner(attn)
            if model is None:
                _warn_no_owner(attn)
                return None
            st = model_state(model)
            for n, m in attention_modules(model).items():
                m.__dict__["_vidattn_owner"] = weakref.ref(model)
                m.__dict__["_vidattn_family"] = st.family
                m.__dict__["_vidattn_self"] = is_self_attention(n, m)
            if st.record is None:
                st._set_record(layout_from_frame(model, loc))
        else:
            st = model_state(model)
        if id(self.pattern) not in st.patterns:
            st.add_pattern(self.pattern)
        return st

    def _plan(self, q, k, v, layout, scale):
        p = self.pattern
        p.validate(layout)
        if getattr(p, "needs_values", False):
            return p.plan(layout, q, k, v=v, scale=scale, num_heads=q.shape[2], device=q.device)
        return p.plan(layout, q, k, num_heads=q.shape[2], device=q.device)

    def _attend(self, q, k, v, layout, scale):
        """Sparse attention on ``[B, S, H, D]`` (heads subset honoured)."""
        if self.heads is None and torch.compiler.is_compiling() and not self.pattern.is_dynamic:
            from vidattn.ops import sparse_attention_op  # custom op: no graph break under torch.compile

            return sparse_attention_op(q, k, v, self.pattern, layout, backend=self.backend, scale=scale), None
        if self.heads is None:
            plan = self._plan(q, k, v, layout, scale)
            return run_plan(q, k, v, plan, backend=self.backend, scale=scale), plan
        H = q.shape[2]
        if k.shape[2] != H:
            raise ValueError("heads= needs as many k/v heads as q heads")
        bad = [h for h in self.heads if not 0 <= h < H]
        if bad:
            raise ValueError(f"heads must be in [0, {H}), got {bad}")
        sel = torch.tensor(self.heads, device=q.device)
        rest = torch.tensor([h for h in range(H) if h not in self.heads], dtype=torch.long, device=q.device)
        out = torch.empty_like(q)
        qs, ks, vs = (t.index_select(2, sel) for t in (q, k, v))
        plan = self._plan(qs, ks, vs, layout, scale)
        out[:, :, sel] = run_plan(qs, ks, vs, plan, backend=self.backend, scale=scale)
        if rest.numel():
            qd, kd, vd = (t.index_select(2, rest).transpose(1, 2) for t in (q, k, v))
            out[:, :, rest] = _F.scaled_dot_product_attention(qd, kd, vd, scale=scale).transpose(1, 2)
        return out, plan

    def _sparse(self, q, k, v, layout, mask, scale, state, layer):
        """Run one intercepted self-attention call. q/k/v ``[B, S, H, D]``; mask None or a key
        mask broadcastable to ``[B, 1, 1, S]`` (bool, or float with 0 / -inf)."""
        keep = _key_padding(mask, q.shape[0], q.shape[1])
        if keep is None:
            out, plan = self._attend(q, k, v, layout, scale)
        else:
            out = self._attend_padded(q, k, v, layout, keep, scale)
            plan = None
        if not torch.compiler.is_compiling():
            st = state.stats
            st.sparse_calls += 1
            st.layout = layout
            if plan is not None:
                st.densities[layer] = _block_density(plan)
                st.token_densities[layer] = plan.token_density  # 0-dim tensor for dynamic plans
        return out

    def _attend_padded(self, q, k, v, layout, keep, scale):
        """Padded text (key mask False on non-grid tokens): per batch element, drop the padded
        tokens, run the pattern on the trimmed layout; padded query rows attend all kept keys."""
        S = q.shape[1]
        g = layout.grid_slice
        if not bool(keep[:, g].all()):
            raise ValueError("attention mask masks video/image tokens; vidattn supports masks on text tokens only")
        out = torch.empty_like(q)
        for b in range(q.shape[0]):
            idx = keep[b].nonzero().squeeze(1)
            if idx.numel() == S:
                out[b:b + 1] = self._attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], layout, scale)[0]
                continue
            pre = int(keep[b, :layout.prefix].sum())
            suf = int(keep[b, g.stop:].sum())
            lay = TokenLayout(layout.grid, prefix=pre, suffix=suf)
            qb, kb, vb = (t[b:b + 1].index_select(1, idx) for t in (q, k, v))
            ob, _ = self._attend(qb, kb, vb, lay, scale)
            drop = (~keep[b]).nonzero().squeeze(1)
            qd = q[b:b + 1].index_select(1, drop).transpose(1, 2)
            od = _F.scaled_dot_product_attention(qd, kb.transpose(1, 2), vb.transpose(1, 2), scale=scale)
            out[b, idx] = ob[0]
            out[b, drop] = od.transpose(1, 2)[0]
        return out


def _block_density(plan):
    """The plan's block density without a per-call host sync: static (cached) plans compute the
    float once; dynamic per-call plans (tensor ``token_density``) give a 0-dim tensor that is
    only read (synchronised) when someone asks for the stats."""
    if isinstance(plan.token_density, torch.Tensor) and "block_density" not in plan.__dict__:
        tot = plan.kv_num_blocks.sum(dtype=torch.float32) + plan.full_kv_num_blocks.sum(dtype=torch.float32)
        return tot / (plan.kv_num_blocks.numel() * plan.num_k_blocks)
    return plan.block_density


_UNION_PARAMS = ("encoder_hidden_states", "attention_mask", "image_rotary_emb", "rotary_emb", "temb",
                 "ip_hidden_states", "ip_adapter_masks")
_accepted: Dict[type, Optional[frozenset]] = {}


def _accepted_kwargs(proc_cls) -> Optional[frozenset]:
    """Keyword names ``proc_cls.__call__`` accepts (None = anything, it has ``**kwargs``)."""
    if proc_cls not in _accepted:
        sig = inspect.signature(proc_cls.__call__)
        if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            _accepted[proc_cls] = None
        else:
            _accepted[proc_cls] = frozenset(sig.parameters)
    return _accepted[proc_cls]


def _filter_kwargs(proc_cls, kwargs: dict) -> dict:
    ok = _accepted_kwargs(proc_cls)
    if ok is None:
        return kwargs
    return {k: v for k, v in kwargs.items() if k in ok}


_subclasses: Dict[Optional[type], type] = {}


def _signature_subclass(inner_cls: Optional[type]) -> type:
    """A subclass of :class:`SparseAttnProcessor` whose ``__call__`` advertises ``inner_cls``'s
    parameters (or the union of the supported processors' when ``inner_cls`` is None)."""
    sub = _subclasses.get(inner_cls)
    if sub is None:
        P = inspect.Parameter
        if inner_cls is not None:
            sig = inspect.signature(inner_cls.__call__)
        else:
            params = [P("self", P.POSITIONAL_OR_KEYWORD), P("attn", P.POSITIONAL_OR_KEYWORD),
                      P("hidden_states", P.POSITIONAL_OR_KEYWORD)]
            params += [P(n, P.POSITIONAL_OR_KEYWORD, default=None) for n in _UNION_PARAMS]
            sig = inspect.Signature(params)

        def __call__(self, attn, hidden_states, *args, **kwargs):
            return SparseAttnProcessor.__call__(self, attn, hidden_states, *args, **kwargs)

        __call__.__signature__ = sig
        sub = type("SparseAttnProcessor", (SparseAttnProcessor,), {"__call__": __call__,
                                                                   "__module__": __name__,
                                                                   "__qualname__": "SparseAttnProcessor"})
        _subclasses[inner_cls] = sub
    return sub


_warned_owner = set()


def _warn_no_owner(attn) -> None:
    key = type(attn).__name__
    if key not in _warned_owner:
        _warned_owner.add(key)
        warnings.warn(f"vidattn SparseAttnProcessor called on a {key} outside a supported diffusers transformer "
                      f"forward ({SUPPORTED_FAMILIES}): no token layout, running the original dense processor",
                      RuntimeWarning, stacklevel=3)


def _key_padding(mask, B, S) -> Optional[torch.Tensor]:
    """None when ``mask`` masks nothing; else Bool ``[B, S]`` of kept keys. Raises ValueError for
    masks that are not a per-key mask."""
    if mask is None:
        return None
    m = mask
    if m.dtype != torch.bool:
        m = m > float("-inf") if m.is_floating_point() else m.bool()
        if mask.is_floating_point() and bool((mask[m] != 0).any()):
            raise ValueError("additive float attention masks with values other than 0/-inf are not supported "
                             "by sparse attention")
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.shape[-1] != S or m.shape[-2] not in (1, S):
        raise ValueError(f"attention mask must broadcast to [B, 1, 1, {S}], got {tuple(mask.shape)}")
    if m.shape[-2] == S and not bool((m == m[..., :1, :]).all()):
        raise ValueError("sparse attention supports key-padding masks only (same mask for every query)")
    m = m[..., 0, :]
    if m.shape[1] != 1 and not bool((m == m[:, :1]).all()):
        raise ValueError("sparse attention supports the same key mask for every head only")
    m = m[:, 0].expand(B, S)
    if bool(m.all()):
        return None
    return m


def _default_for(attn, family, self_attention=True):
    """Default processor instance for ``attn`` (used by hand-installed SparseAttnProcessor)."""
    import importlib

    cls = getattr(type(attn), "_default_processor_cls", None)
    if cls is not None:
        return cls()
    if family in _FAMILY_DEFAULT and self_attention:
        mod, name = _FAMILY_DEFAULT[family]
        return getattr(importlib.import_module(mod), name)()
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()
