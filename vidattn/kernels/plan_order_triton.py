"""Device-side plan token order shared by the Triton kernels (no torch, no plan types).

A plan may run its tokens in a permuted order: plan position ``i`` holds original token
``perm[h, i]`` (:mod:`vidattn.plan_order`). A kernel that reads or writes tokens at their original
positions maps its plan positions through :func:`token_of_position`.
"""

import triton
import triton.language as tl

__all__ = ["token_of_position"]


@triton.jit
def token_of_position(PERM, perm_off, pos, ok, HAS_PERM: tl.constexpr):
    """Original token index of the plan positions ``pos`` (int ``[n]``): ``PERM[perm_off + pos]``
    (0 where ``ok`` is false) with a permutation (HAS_PERM), else ``pos`` itself."""
    tok = pos
    if HAS_PERM:
        tok = tl.load(PERM + perm_off + pos, mask=ok, other=0)
    return tok
