"""Kernel forms of token rules: the compiled, kernel-neutral description a rule hands a backend.

A :class:`~vidattn.plan.TokenRule` evaluates itself with torch ops (reference, FlexAttention,
precomputed per-block masks). A rule that a kernel can also evaluate *in-kernel* returns one of
the plain dataclasses below from ``TokenRule.kernel_form()``; a backend dispatches on the form's
type, so neither side imports the other (patterns know nothing of kernels, kernels nothing of
patterns). A rule without a kernel form returns None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

__all__ = ["NeighborhoodForm"]


@dataclass(frozen=True)
class NeighborhoodForm:
    """Multi-axis neighborhood rule (NATTEN semantics, see :mod:`vidattn.patterns.neighborhood`).

    Fields: ``grid`` axis sizes (1-3 axes for the Triton kernel); ``prefix`` / ``suffix`` non-grid
    token counts; per-axis ``kernel_size``, ``dilation``, ``stride`` ints and ``is_causal`` bools;
    ``dense_nongrid``: non-grid tokens attend / are attended by every token (else only each other).
    """

    grid: Tuple[int, ...]
    prefix: int
    suffix: int
    kernel_size: Tuple[int, ...]
    dilation: Tuple[int, ...]
    stride: Tuple[int, ...]
    is_causal: Tuple[bool, ...]
    dense_nongrid: bool = True
