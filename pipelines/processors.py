"""Sparse attention processors for diffusers transformers (Wan, HunyuanVideo, CogVideoX, LTX-Video,
FLUX, and any processor that calls ``dispatch_attention_fn`` on ``[B, S, H, D]``).

How it plugs in (see docs/diffusers_integration.md):

* :class:`SparseAttnProcessor` wraps the model's own processor (the object that was installed, or
  the family default when installed by hand). Its inner processor's ``_attention_backend`` is the
  registered ``"vidattn"`` diffusers backend (:mod:`.diffusers_backend`), so the original
  processor code runs unchanged - QK norms, rotary embeddings, text masks, output projections -
  and its ``dispatch_attention_fn`` call reaches vidattn, including under diffusers' context
  parallelism. The wrapper marks the call in flight (``diffusers_backend.CURRENT``) so the backend
  knows the layer, the model state and the pattern; self-attention over the recorded layout runs
  sparse, every other call goes to the backend the user chose (``set_attention_backend``).
* Processors that call ``F.scaled_dot_product_attention`` themselves (CogVideoX; no dispatcher)
  keep the one remaining processor swap: their ``__call__`` runs with ``F`` bound to a proxy whose
  ``scaled_dot_product_attention`` ([B, H, S, D]) reaches the same decision. diffusers offers no
  hook for those.

Layout and step: :mod:`.hooks` (``ModelState``).
"""

from __future__ import annotations

import inspect
from typing import Dict, Iterable, Optional

import torch
import torch.nn.functional as _F
from torch.overrides import TorchFunctionMode

from vidattn.attention import BACKENDS, _profiler_range, plan_for_call, run_plan
from vidattn.backends import warn_once
from vidattn.layout import TokenLayout
from vidattn.patterns.base import Pattern

from . import diffusers_backend as _db
from . import diffusers_compat as _compat
from .hooks import (OWNER_ATTR, AttentionStats, ModelState, attention_modules, is_self_attention, model_state,
                    watch_for_owner)
from .layout_discovery import SUPPORTED_FAMILIES

__all__ = ["SparseAttnProcessor", "ModelState", "AttentionStats", "model_state", "is_self_attention",
           "attention_modules"]

_OWNER = OWNER_ATTR
_MISSING = object()


# =============================================================================== processors outside the dispatcher
class _SdpaRoute(TorchFunctionMode):
    """While a non-dispatcher processor runs (CogVideoX), ``F.scaled_dot_product_attention``
    (``[B, H, S, D]``) goes to the running SparseAttnProcessor's decision; every other torch
    function runs unchanged. A public torch mechanism (``__torch_function__`` modes), so the
    processor's own code is not copied or rebound."""

    _PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        proc = _db.CURRENT.proc
        if func is _F.scaled_dot_product_attention and proc is not None and len(args) <= len(self._PARAMS) \
                and set(kwargs) <= set(self._PARAMS[len(args):]):
            a = dict(zip(self._PARAMS, args), **kwargs)
            q, k, v = a["query"], a["key"], a["value"]
            if q.dim() == 4:
                out = proc._dispatch(_db.CURRENT.attn, _db.CURRENT.dense, q.transpose(1, 2), k.transpose(1, 2),
                                     v.transpose(1, 2), a.get("attn_mask"), a.get("dropout_p", 0.0),
                                     a.get("is_causal", False), a.get("scale"), False, False, None, sdpa=True)
                return out.transpose(1, 2)
        return func(*args, **kwargs)


uses_dispatcher = _compat.uses_dispatcher


_FAMILY_DEFAULT = {
    "hunyuan_video": ("diffusers.models.transformers.transformer_hunyuan_video", "HunyuanVideoAttnProcessor2_0"),
    "cogvideox": ("diffusers.models.attention_processor", "CogVideoXAttnProcessor2_0"),
}


# =============================================================================== processor
_IN_FLIGHT_LAYER: Optional[int] = None


def current_layer() -> Optional[int]:
    """The self-attention layer index (the model's own numbering) of the sparse call running now,
    or None outside one; for observers of :func:`vidattn.attention.run_plan` such as the quality
    probes. One process-wide value: calls are not concurrent within a forward."""
    return _IN_FLIGHT_LAYER


class SparseAttnProcessor:
    """Diffusers attention processor running ``pattern`` on self-attention over video/image tokens.

    Args:
        pattern: a vidattn pattern (``Neighborhood``, ``Radial``, ``PermutedGrid``, ``RectifiedSparse``,
            ...). None (``SparseAttnProcessor()``, as diffusers' ``load_ip_adapter`` rebuilds
            processors with ``type(proc)()``): the module's default processor, dense.
        inner: the processor to wrap (its code computes QKV, norms, RoPE, output projections); None
            = the attention module's default processor (when installed by hand with
            ``transformer.set_attn_processor(SparseAttnProcessor(pattern))``).
        backend: ``"auto" | "reference" | "flex" | "triton"``.
        dense_steps: the first ``dense_steps`` denoising steps of each pipeline call run dense.
        dense_layers: self-attention layer indices (order of ``ModelState.layer_names``) that run dense.
        heads: query-head indices to sparsify (others dense); None = all heads. Global head ids
            (also under Ulysses, where each rank holds a slice of the heads).

    Called like the wrapped processor: ``proc(attn, hidden_states, *args, **kwargs)``; tensors
    keep the original processor's shapes and dtypes (hidden_states ``[B, S, C]``). Attention inside
    is ``[B, S, H, D]``. ``set_attention_backend(name)`` on the model sets the backend of the calls
    vidattn leaves dense (kept by ``vidattn.remove``); ``enable_parallelism`` sets the inner
    processor's ``_parallel_config``.
    """

    def __init__(self, pattern: Optional[Pattern] = None, inner=None, *, backend: str = "auto", dense_steps: int = 0,
                 dense_layers: Iterable[int] = (), heads: Optional[Iterable[int]] = None, layer: Optional[int] = None):
        if pattern is not None and not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a vidattn pattern (Neighborhood, Radial, ...), got {type(pattern).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(dense_steps, bool) or not isinstance(dense_steps, int) or dense_steps < 0:
            raise ValueError(f"dense_steps must be an int >= 0, got {dense_steps!r}")
        self.pattern = pattern
        self.always_dense = pattern is None  # Dense() runs its full plan when a layout exists, else dense
        self.inner = inner
        self.backend = backend
        self.dense_steps = dense_steps
        self.dense_layers = frozenset(int(i) for i in dense_layers)
        self.heads = None if heads is None else tuple(sorted(int(h) for h in heads))
        self.layer = layer
        self._inners: Dict[int, object] = {}
        self._user_backend = None
        self._pc = None
        self._inner_saved = _MISSING
        self._member = _db.register()
        if inner is not None:
            self._adopt(inner)
        elif pattern is not None:
            watch_for_owner(self)  # installed by hand: bound on its transformer's first call
        # diffusers' Attention.forward filters cross_attention_kwargs by
        # inspect.signature(processor.__call__): expose the wrapped processor's parameters
        if type(self) is SparseAttnProcessor:
            self.__class__ = _signature_subclass(None if inner is None else type(inner))

    # ------------------------------------------------------------------ backend / parallel attributes
    def _adopt(self, inner) -> None:
        """Route ``inner``'s dispatcher calls to vidattn (restored by :meth:`release`)."""
        self._inner_saved = inner.__dict__.get(_compat.BACKEND_ATTR, _MISSING)
        self._user_backend = getattr(inner, _compat.BACKEND_ATTR, None)
        self._pc = getattr(inner, _compat.PARALLEL_ATTR, None)
        self._dispatcher = uses_dispatcher(type(inner))
        if self._dispatcher:
            setattr(inner, _compat.BACKEND_ATTR, self._member)

    def release(self) -> None:
        """Give the wrapped processor back its backend setting: the user's latest
        ``set_attention_backend`` choice, else its original value (bit-exact restore)."""
        inner = self.inner
        if inner is None or not self._dispatcher:
            return
        if self._inner_saved is _MISSING and self._user_backend is None:
            inner.__dict__.pop(_compat.BACKEND_ATTR, None)
        else:
            setattr(inner, _compat.BACKEND_ATTR, self._user_backend)

    # diffusers' processor attributes (``_compat.BACKEND_ATTR`` / ``PARALLEL_ATTR``, set as
    # properties below the class): what diffusers reads and writes on this processor
    def _get_backend(self):
        """What diffusers sees: the vidattn backend (context-parallel capable)."""
        return self._member

    def _set_backend(self, value):
        # model.set_attention_backend(name) / reset_attention_backend(): the backend of dense calls
        self._user_backend = None if _db.is_vidattn_backend(value) else value

    def _get_parallel(self):
        return self._pc

    def _set_parallel(self, value):
        self._pc = value
        for inner in ([self.inner] if self.inner is not None else []) + list(self._inners.values()):
            setattr(inner, _compat.PARALLEL_ATTR, value)

    # ------------------------------------------------------------------ call
    # diffusers calls processors positionally: (attn, hidden_states, encoder_hidden_states, ...)
    def __call__(self, attn, hidden_states, *args, **kwargs):
        inner = self._inner_for(attn)
        if kwargs:
            kwargs = _filter_kwargs(type(inner), kwargs)
        state = self._state_for(attn)
        dense = self.always_dense or state is None
        if not dense:
            if self.dense_steps and state.dense_step(self.dense_steps):
                dense = True
            elif self.dense_layers and self._layer(attn, state) in self.dense_layers:
                dense = True
        cur = _db.CURRENT
        prev = (cur.proc, cur.attn, cur.dense)
        cur.proc, cur.attn, cur.dense = self, attn, dense
        try:
            if self._dispatcher_for(inner):
                out = inner(attn, hidden_states, *args, **kwargs)
            else:
                with _SdpaRoute():
                    out = inner(attn, hidden_states, *args, **kwargs)
        finally:
            cur.proc, cur.attn, cur.dense = prev
        return out

    def _layer(self, attn, state) -> Optional[int]:
        return self.layer if self.layer is not None else state.layer_of.get(id(attn))

    def _dispatcher_for(self, inner) -> bool:
        return self._dispatcher if inner is self.inner else uses_dispatcher(type(inner))

    def _dispatch(self, attn, dense, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, return_lse, pc,
                  sdpa=False):
        """One attention call from the inner processor (``q/k/v [B, S, H, D]``): sparse or dense."""
        state = None if dense else self._state_for(attn)
        layout = None
        if state is not None and not (is_causal or dropout_p) and q.shape[1] == k.shape[1] and q.dim() == 4:
            world = 1
            if pc is not None and getattr(pc, "context_parallel_config", None) is not None:
                cp = pc.context_parallel_config
                world = cp.ring_degree * cp.ulysses_degree
            layout = state.layout_for(q.shape[1] * world)
        if layout is None:
            if state is not None or dense:
                self._count_dense(attn, dense)
            if sdpa:
                out = _F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                                      scale=scale)
                return out.transpose(1, 2)
            return _db.dense_attention(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, return_lse, pc,
                                       user_backend=self._user_backend)
        layer = None if torch.compiler.is_compiling() else self._layer(attn, state)
        if pc is not None:
            from vidattn import context_parallel as _cp

            if _key_padding(mask, q.shape[0], q.shape[1]) is not None:
                raise ValueError("vidattn under context parallelism supports unmasked self-attention only "
                                 "(a text key-padding mask reached the sparse path)")
            return _cp.sparse_attention_cp(self, q, k, v, layout, scale, return_lse, pc, state, layer)
        return self._sparse(q, k, v, layout, mask, scale, state, layer, return_lse=return_lse)

    def _count_dense(self, attn, dense) -> None:
        if torch.compiler.is_compiling():
            return
        st = self._state_for(attn) if not self.always_dense else None
        if st is None:
            ref = attn.__dict__.get(_OWNER)
            model = ref() if ref is not None else None
            st = model_state(model, create=False) if model is not None else None
        if st is not None and st.self_attention.get(id(attn), True):
            st.stats.dense_calls += 1

    # ------------------------------------------------------------------ helpers
    def _inner_for(self, attn):
        if self.inner is not None:
            return self.inner
        inner = self._inners.get(id(attn))
        if inner is None:
            st = self._state_for(attn)
            fam = st.family if st is not None else None
            selfattn = st.self_attention.get(id(attn), True) if st is not None else True
            inner = _default_for(attn, fam, selfattn)
            if uses_dispatcher(type(inner)):
                setattr(inner, _compat.BACKEND_ATTR, self._member)
            pc = self._pc
            if pc is None and st is not None:  # installed by hand after enable_parallelism
                model = st._model()
                pc = getattr(model, _compat.PARALLEL_ATTR, None) if model is not None else None
                if pc is not None and getattr(pc, "context_parallel_config", None) is None:
                    pc = None
                self._pc = pc
            setattr(inner, _compat.PARALLEL_ATTR, pc)
            self._inners[id(attn)] = inner
        return inner

    def _state_for(self, attn) -> Optional[ModelState]:
        ref = attn.__dict__.get(_OWNER)
        model = ref() if ref is not None else None
        if model is None:
            if self.always_dense and self.pattern is None:
                return None
            _warn_no_owner(attn)
            return None
        st = model.__dict__.get("_vidattn_state")
        if st is None:
            st = model_state(model)
        if self.pattern is not None and id(self.pattern) not in st.patterns:
            st.add_pattern(self.pattern)
        return st

    def _plan(self, q, k, v, layout, scale, head_ids=None, total_heads=None):
        """Plan for ``q/k/v [B, S, h, D]``. ``head_ids``: the global ids of the ``h`` heads (None:
        ``0..h-1``); static per-head plans are built for ``total_heads`` and indexed by them."""
        p = self.pattern
        p.validate(layout)
        h = q.shape[2]
        if not p.is_dynamic and head_ids is not None and total_heads is not None and total_heads != h:
            from vidattn.context_parallel import slice_plan_heads

            plan = p.plan(layout, num_heads=total_heads, device=q.device)
            return slice_plan_heads(plan, head_ids, total_heads)
        if not p.is_dynamic and head_ids is not None and list(head_ids) != list(range(h)):
            from vidattn.context_parallel import slice_plan_heads

            plan = p.plan(layout, num_heads=total_heads or h, device=q.device)
            return slice_plan_heads(plan, head_ids, total_heads or h)
        extra = {}
        if getattr(p, "uses_state_key", False) and getattr(self, "_state_layer", None) is not None:
            # per-layer (and head subset) warm start of stateful dynamic patterns, e.g. Clustered
            extra["state_key"] = (getattr(self, "_state_layer", None), None if head_ids is None else tuple(head_ids))
        return plan_for_call(p, layout, q, k, v, scale=scale, **extra)

    def _attend(self, q, k, v, layout, scale, head_offset: int = 0, total_heads: Optional[int] = None,
                return_lse: bool = False, restrict=None):
        """Sparse attention on ``[B, S, h, D]`` whose heads are global heads
        ``head_offset .. head_offset + h - 1`` of ``total_heads`` (``heads=`` honoured by global id).
        ``restrict(plan) -> plan`` (Ring: only the local query rows). Returns
        ``((out [B, S, h, D], lse float32 [B, h, S] or None), plan)``."""
        H = q.shape[2]
        total = H if total_heads is None else total_heads
        plain = head_offset == 0 and total == H and restrict is None and not return_lse
        if (self.heads is None and plain and torch.compiler.is_compiling() and not self.pattern.is_dynamic):
            from vidattn.ops import sparse_attention_op  # custom op: no graph break under torch.compile

            return (sparse_attention_op(q, k, v, self.pattern, layout, backend=self.backend, scale=scale), None), None
        if k.shape[2] != H and (self.heads is not None or total != H):
            raise ValueError("heads= / context parallelism need as many k/v heads as q heads")
        if self.heads is None:
            ids = None if (head_offset == 0 and total == H) else list(range(head_offset, head_offset + H))
            plan = self._plan(q, k, v, layout, scale, ids, total)
            if restrict is not None:
                plan = restrict(plan)
            res = run_plan(q, k, v, plan, backend=self.backend, scale=scale, return_lse=return_lse)
            return (res if return_lse else (res, None)), plan
        bad = [h for h in self.heads if not 0 <= h < total]
        if bad:
            raise ValueError(f"heads must be in [0, {total}), got {bad}")
        local = [h - head_offset for h in self.heads if head_offset <= h < head_offset + H]
        rest_l = [h for h in range(H) if h not in local]
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[0], H, q.shape[1], dtype=torch.float32) if return_lse else None
        plan = None
        if local:
            sel = torch.tensor(local, device=q.device)
            qs, ks, vs = (t.index_select(2, sel) for t in (q, k, v))
            plan = self._plan(qs, ks, vs, layout, scale, [h + head_offset for h in local], total)
            if restrict is not None:
                plan = restrict(plan)
            res = run_plan(qs, ks, vs, plan, backend=self.backend, scale=scale, return_lse=return_lse)
            if return_lse:
                out[:, :, sel], lse[:, sel] = res[0], res[1]
            else:
                out[:, :, sel] = res
        if rest_l:
            rest = torch.tensor(rest_l, dtype=torch.long, device=q.device)
            qd, kd, vd = (t.index_select(2, rest) for t in (q, k, v))
            if return_lse:
                od, ld = _db._sdpa_lse(qd, kd, vd, None, scale)
                out[:, :, rest], lse[:, rest] = od, ld.transpose(1, 2)
            else:
                od = _F.scaled_dot_product_attention(qd.transpose(1, 2), kd.transpose(1, 2), vd.transpose(1, 2),
                                                     scale=scale).transpose(1, 2)
                out[:, :, rest] = od
        return (out, lse), plan

    def _record(self, state, layout, layer, plan, cp: bool = False) -> None:
        if torch.compiler.is_compiling():
            return
        st = state.stats
        st.sparse_calls += 1
        st.cp_calls += int(cp)
        st.layout = layout
        if plan is not None and layer is not None:
            st.densities[layer] = _block_density(plan)
            st.token_densities[layer] = plan.token_density  # 0-dim tensor for dynamic plans

    def _sparse(self, q, k, v, layout, mask, scale, state, layer, return_lse=False):
        """Run one self-attention call sparse. q/k/v ``[B, S, H, D]``; mask None or a key mask
        broadcastable to ``[B, 1, 1, S]`` (bool, or float with 0 / -inf)."""
        keep = _key_padding(mask, q.shape[0], q.shape[1])
        self._state_layer = layer  # warm-start key of stateful dynamic patterns (Clustered)
        global _IN_FLIGHT_LAYER
        prev, _IN_FLIGHT_LAYER = _IN_FLIGHT_LAYER, layer
        try:
            with _profiler_range("vidattn::sparse_call"):  # torch.profiler range (vidattn.bench.breakdown)
                if keep is None:
                    (out, lse), plan = self._attend(q, k, v, layout, scale, return_lse=return_lse)
                else:
                    if return_lse:
                        raise ValueError("return_lse with a text key-padding mask is not supported by vidattn")
                    out, lse = self._attend_padded(q, k, v, layout, keep, scale), None
                    plan = None
        finally:
            _IN_FLIGHT_LAYER = prev
        self._record(state, layout, layer, plan)
        return (out, lse.transpose(1, 2)) if return_lse else out

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
                out[b:b + 1] = self._attend(q[b:b + 1], k[b:b + 1], v[b:b + 1], layout, scale)[0][0]
                continue
            pre = int(keep[b, :layout.prefix].sum())
            suf = int(keep[b, g.stop:].sum())
            lay = TokenLayout(layout.grid, prefix=pre, suffix=suf)
            qb, kb, vb = (t[b:b + 1].index_select(1, idx) for t in (q, k, v))
            (ob, _), _ = self._attend(qb, kb, vb, lay, scale)
            drop = (~keep[b]).nonzero().squeeze(1)
            qd = q[b:b + 1].index_select(1, drop).transpose(1, 2)
            od = _F.scaled_dot_product_attention(qd, kb.transpose(1, 2), vb.transpose(1, 2), scale=scale)
            out[b, idx] = ob[0]
            out[b, drop] = od.transpose(1, 2)[0]
        return out


# diffusers' processor protocol: set_attention_backend / enable_parallelism write these attributes
setattr(SparseAttnProcessor, _compat.BACKEND_ATTR, property(SparseAttnProcessor._get_backend,
                                                           SparseAttnProcessor._set_backend))
setattr(SparseAttnProcessor, _compat.PARALLEL_ATTR, property(SparseAttnProcessor._get_parallel,
                                                            SparseAttnProcessor._set_parallel))

def _warn_no_owner(attn) -> None:
    key = type(attn).__name__
    warn_once(f"no-owner:{key}", f"vidattn SparseAttnProcessor called on a {key} outside a supported diffusers "
                                 f"transformer forward ({SUPPORTED_FAMILIES}): no token layout, running the original "
                                 f"dense processor")


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

    cls = _compat.default_processor_cls(type(attn))
    if cls is not None:
        return cls()
    if family in _FAMILY_DEFAULT and self_attention:
        mod, name = _FAMILY_DEFAULT[family]
        return getattr(importlib.import_module(mod), name)()
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()
