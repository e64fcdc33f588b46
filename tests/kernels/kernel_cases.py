"""Inputs and plans shared by the Triton kernel tests (forward and backward)."""

import torch

from vidattn.plan import TokenRule, plan_from_rule


class StripeRule(TokenRule):
    """A rule with no in-kernel form (the per-block mask path); every query keeps its own key."""

    def __call__(self, h, q_idx, k_idx):
        return ((q_idx + 2 * k_idx + h) % 3 != 0) | (q_idx == k_idx)


def per_head_permuted_plan(rule, seq_len: int, num_heads: int, block_q: int, block_k: int, seed: int):
    """``plan_from_rule(rule)`` in a random token order per head (``perm [num_heads, seq_len]`` from
    a generator seeded with ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.stack([torch.randperm(seq_len, generator=g) for _ in range(num_heads)])
    return plan_from_rule(rule, seq_len=seq_len, block_q=block_q, block_k=block_k, num_heads=num_heads, perm=perm)


def random_qkv(B: int, S: int, H: int, Hk: int, D: int, dtype, seed: int, requires_grad: bool = False):
    """``q [B, S, H, D]``, ``k, v [B, S, Hk, D]`` standard normal in ``dtype`` (drawn in float32 in
    that order from a generator seeded with ``seed``), leaves requiring grad with ``requires_grad``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, n, D, generator=g).to(dtype).requires_grad_(requires_grad) for n in (H, Hk, Hk)]
