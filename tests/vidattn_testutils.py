"""Shared test helpers (independent references)."""

import torch


def dense_masked_attention(q, k, v, mask, scale=None):
    """Independent reference: torch SDPA (float64) with a boolean mask.

    q/k/v ``[B, S, H, D]``; mask Bool ``[h, S, S]`` (h = 1 or H) or ``[B, h, S, S]``.
    Returns float64 ``[B, S, H, D]``.
    """
    qh, kh, vh = (t.transpose(1, 2).double() for t in (q, k, v))
    if kh.shape[1] != qh.shape[1]:
        rep = qh.shape[1] // kh.shape[1]
        kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
    m = mask if mask.dim() == 4 else mask[None]
    o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=m, scale=scale)
    return o.transpose(1, 2)
