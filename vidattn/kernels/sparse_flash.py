"""Fused Triton block-sparse flash attention (forward) executing a :class:`~vidattn.plan.BlockPlan`.

A facade over three modules with one job each:

* :mod:`.sparse_flash_kernel`: the device code (``@triton.jit``) and :class:`RuleMode`;
* :mod:`.sparse_flash_tables`: per-plan launch tables (block lists, schedules, the neighborhood
  lowering, per-partial-block masks), cached per plan;
* :mod:`.sparse_flash_launch`: input checks, launch configuration (env overrides, TMA) and the
  launcher :func:`block_sparse_attention_triton`;
* :mod:`.quant_fp8`: the quantisation prologue of the opt-in quantised precisions ``"fp8"``,
  ``"int8"`` and ``"int8_fp8"`` (e4m3 or int8 Q per token and K per block with K smoothing, e4m3 V per channel
  for an 8-bit P.V) and their capability check.

Anything unsupported raises :class:`~vidattn.errors.TritonUnsupported` (a ``BackendUnsupported``).
"""

from vidattn.errors import TritonUnsupported

from .sparse_flash_kernel import LOG2E, RuleMode
from .sparse_flash_launch import (block_sparse_attention_triton, check_triton_inputs, kv_descriptor, last_launch,
                                  launch_config)
from .sparse_flash_tables import (MASK_BUDGET_BYTES, ProgramOrder, neighborhood_tables, partial_block_masks,
                                  partial_mask_bytes, plan_launch_tables)

__all__ = ["block_sparse_attention_triton", "TritonUnsupported", "neighborhood_tables", "partial_block_masks",
           "partial_mask_bytes", "plan_launch_tables", "kv_descriptor", "launch_config", "check_triton_inputs",
           "last_launch", "RuleMode", "ProgramOrder", "MASK_BUDGET_BYTES", "LOG2E"]
