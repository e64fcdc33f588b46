"""vidattn as a registered diffusers attention backend (``"vidattn"``).

diffusers routes every ``dispatch_attention_fn(q, k, v, ..., backend=processor._attention_backend,
parallel_config=processor._parallel_config)`` call (``[B, S, H, D]``) to a function registered in
its ``_AttentionBackendRegistry``. vidattn registers one, :func:`vidattn_attention`, with
``supports_context_parallel=True``: under ``transformer.enable_parallelism(...)`` it runs inside
diffusers' ``_templated_context_parallel_attention`` (Ulysses all-to-all, Ring LSE merge, or both)
with vidattn's own forward ops (:mod:`vidattn.context_parallel`).

There is no public registration API in diffusers (0.42): like NVIDIA ModelOpt and cache-dit, the
name is added to ``AttentionBackendName`` and the function given to the registry, guarded by a
check of the pieces used (:func:`check_diffusers`, a clear error on other versions).

Which call goes sparse is decided per call from the processor that is running
(:class:`~vidattn.pipelines.processors.SparseAttnProcessor` sets :data:`CURRENT` around its
inner processor; the registry passes the backend no caller information): self-attention whose
length matches the recorded token layout runs the pattern; everything else - cross-attention,
text-only attention, the dense schedule - goes to the backend the user chose with
``set_attention_backend`` (or diffusers' active backend), untouched.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import diffusers_compat as _compat

__all__ = ["BACKEND_NAME", "MIN_DIFFUSERS", "check_diffusers", "register", "vidattn_attention", "CURRENT",
           "dense_attention", "is_vidattn_backend"]

BACKEND_NAME = "vidattn"
MIN_DIFFUSERS = _compat.MIN_DIFFUSERS
_member = None


class _Current:
    """The attention call in flight: set by a SparseAttnProcessor around its inner processor,
    read by :func:`vidattn_attention`. ``proc`` None = no vidattn processor (run dense)."""

    def __init__(self):
        # instance attributes from the start: compiled graphs guard on this __dict__'s keys
        self.proc = None
        self.attn = None
        self.dense = False


CURRENT = _Current()


def check_diffusers():
    """Check that the installed diffusers has what vidattn's backend uses (``RuntimeError``
    naming the minimum version otherwise); see :mod:`.diffusers_compat`."""
    return _compat.check()


def register():
    """Register the ``"vidattn"`` backend once; returns its ``AttentionBackendName`` member.
    Raises RuntimeError on an unsupported diffusers."""
    global _member
    if _member is None:
        _compat.check()
        _member = _compat.register_backend("VIDATTN", BACKEND_NAME, vidattn_attention)
    return _member


def is_vidattn_backend(name) -> bool:
    """True for the vidattn backend's name or member."""
    return name is not None and str(getattr(name, "value", name)) == BACKEND_NAME


# =============================================================================== dense paths
def _sdpa_lse(q, k, v, attn_mask, scale):
    """Exact dense attention with LSE on ``[B, S, H, D]``: (out ``[B, S, H, D]`` in q's dtype,
    lse float32 ``[B, S, H]``)."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    qh, kh, vh = (t.transpose(1, 2).float() for t in (q, k, v))
    logits = torch.matmul(qh, kh.transpose(-1, -2)) * s
    if attn_mask is not None:
        m = attn_mask
        if m.dim() == 2:
            m = m[:, None, None, :]
        logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.matmul(torch.softmax(logits, dim=-1), vh)
    return out.transpose(1, 2).to(q.dtype), lse.transpose(1, 2).contiguous()


def _native_forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
    """Dense forward op for diffusers' templated context parallelism (LSE included, so Ring works
    on every device)."""
    if _save_ctx:
        ctx.save_for_backward(query, key, value)
        ctx.vidattn_mask, ctx.vidattn_scale = attn_mask, scale
    if return_lse:
        if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and attn_mask is None:
            res = torch.ops.aten._scaled_dot_product_flash_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), 0.0, False, False, scale=scale)
            return res[0].transpose(1, 2), res[1].transpose(1, 2).float()
        return _sdpa_lse(query, key, value, attn_mask, scale)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return out.transpose(1, 2)


def _native_backward_op(ctx, grad_out, *args, **kwargs):
    if "out" in kwargs or "lse" in kwargs:
        raise NotImplementedError("vidattn: Ring attention backward is not implemented (inference only); "
                                  "use Ulysses (ulysses_degree) for training under context parallelism")
    query, key, value = ctx.saved_tensors
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_(True) for t in (query, key, value))
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=ctx.vidattn_mask,
            scale=ctx.vidattn_scale).transpose(1, 2)
        return torch.autograd.grad(out, (q, k, v), grad_out)


def dense_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                    return_lse=False, parallel_config=None, user_backend=None):
    """A call vidattn leaves dense: the user's backend (``set_attention_backend``) if one was
    chosen, else diffusers' active backend, exactly as the unpatched processor would call it. Under
    context parallelism without a user choice, vidattn's own exact dense forward op (which returns
    the LSE Ring needs)."""
    if is_vidattn_backend(user_backend):
        user_backend = None
    if parallel_config is not None and user_backend is None:
        return _compat.templated_cp_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                              return_lse, forward_op=_native_forward_op,
                                              backward_op=_native_backward_op, parallel_config=parallel_config)
    if user_backend is None and is_vidattn_backend(_compat.active_backend()):
        # set_attention_backend("vidattn") / attention_backend("vidattn") made vidattn the active backend
        user_backend = _compat.native_backend()
    kw = {"return_lse": True} if return_lse else None
    return _compat.dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                         is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, attention_kwargs=kw,
                                         backend=user_backend, parallel_config=parallel_config)


# =============================================================================== the backend
def vidattn_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0, is_causal: bool = False,
                      scale: Optional[float] = None, enable_gqa: bool = False, return_lse: bool = False,
                      _parallel_config=None):
    """diffusers attention backend: ``query/key/value [B, S, H, D]`` (any float dtype), optional
    ``attn_mask`` (bool or additive, broadcastable to ``[B, H, S, S]``). Returns ``[B, S, H, D]``
    in the query's dtype (and the float32 LSE ``[B, S, H]`` with ``return_lse``).

    Sparse for self-attention of the running :class:`SparseAttnProcessor` whose (global) length
    matches the model's token layout; dense (the user's backend) otherwise."""
    proc = CURRENT.proc
    if proc is None:
        return dense_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                               _parallel_config)
    return proc._dispatch(CURRENT.attn, CURRENT.dense, query, key, value, attn_mask, dropout_p, is_causal, scale,
                          enable_gqa, return_lse, _parallel_config)


