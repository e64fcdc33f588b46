"""BlockPlan -> FlashAttention-4 block-sparse tensors (vidattn.bench.fa4_layout), on CPU.

The reference is the random block-class tensor the plan is built from: the FA4 tensors, read back
densely, must list exactly its full and partial blocks, in FA4's documented shapes and dtypes.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vidattn.bench.fa4_layout import (
    fa4_block_classes,
    fa4_sm90_tile,
    fa4_unsupported_reason,
    plan_to_fa4_block_sparse,
)
from vidattn.plan import FULL, PARTIAL, plan_from_block_mask


def _plan(cls, S, bq, bk, **kw):
    rule = (lambda h, q, k: q >= 0) if bool((cls == PARTIAL).any()) else None
    return plan_from_block_mask(cls, seq_len=S, block_q=bq, block_k=bk, rule=rule, token_density=0.5, **kw)


@settings(max_examples=12, deadline=None)
@given(bp=st.sampled_from([1, 2]), hp=st.sampled_from([1, 3]), n=st.integers(1, 6), bq=st.sampled_from([128, 256]),
       tail=st.integers(0, 127), seed=st.integers(0, 2**16))
def test_round_trip_equals_block_classes(bp, hp, n, bq, tail, seed):
    g = torch.Generator().manual_seed(seed)
    S = n * 128 - tail
    nq, nk = -(-S // bq), n
    cls = torch.randint(0, 3, (bp, hp, nq, nk), generator=g).to(torch.int8)
    plan = _plan(cls, S, bq, 128)
    t = plan_to_fa4_block_sparse(plan)
    for name in ("mask_block_cnt", "full_block_cnt"):
        c = getattr(t, name)
        assert c.dtype == torch.int32 and tuple(c.shape) == (bp, hp, nq)
    for name in ("mask_block_idx", "full_block_idx"):
        i = getattr(t, name)
        assert i.dtype == torch.int32 and i.is_contiguous() and i.shape[:3] == (bp, hp, nq)
        assert 1 <= i.shape[3] <= nk
    assert t.block_size == (bq, 128)
    back = fa4_block_classes(t, nk)
    assert torch.equal(back, cls)


def test_full_only_plan_has_empty_mask_lists_and_is_supported():
    cls = torch.full((1, 2, 3, 3), FULL, dtype=torch.int8)
    cls[0, 1, 2, 0] = 0
    plan = _plan(cls, 3 * 128 - 5, 128, 128)
    t = plan_to_fa4_block_sparse(plan)
    assert t.mask_block_cnt.sum() == 0 and t.mask_block_idx.shape[-1] == 1  # zero width padded to 1
    assert t.full_block_cnt.tolist() == [[[3, 3, 3], [3, 3, 2]]]
    assert t.full_block_idx[0, 1, 2, :2].tolist() == [1, 2]
    assert fa4_unsupported_reason(plan, head_dim=128) is None


def test_reasons_name_the_mismatch():
    cls = torch.full((1, 1, 4, 4), FULL, dtype=torch.int8)
    assert "block_k=64" in fa4_unsupported_reason(_plan(cls, 4 * 64, 64, 64), head_dim=128)
    r = fa4_unsupported_reason(_plan(cls[:, :, :2], 4 * 64, 128, 64), head_dim=128)
    assert "tile_n=128" in r
    cls2 = cls.clone()
    cls2[0, 0, 0, 0] = PARTIAL
    assert "partial" in fa4_unsupported_reason(_plan(cls2, 512, 128, 128), head_dim=128)
    perm = torch.arange(512)[None].flip(-1)
    assert "permutes" in fa4_unsupported_reason(_plan(cls, 512, 128, 128, perm=perm), head_dim=128)
    assert "tile_n=80" in fa4_unsupported_reason(_plan(cls, 512, 128, 128), head_dim=256)


def test_sm90_tile_rule():
    assert fa4_sm90_tile(128) == (128, 128)
    assert fa4_sm90_tile(64, block_q=128) == (128, 128)
    assert fa4_sm90_tile(64, block_q=384) == (192, 128)
    assert fa4_sm90_tile(96, block_q=192) == (192, 144)
    assert fa4_sm90_tile(192, head_dim_v=192) == (128, 112)
    with pytest.raises(ValueError, match="head_dim"):
        fa4_sm90_tile(0)


def test_bad_plan_shapes_raise():
    cls = torch.full((1, 1, 2, 2), FULL, dtype=torch.int8)
    plan = _plan(cls, 256, 128, 128)
    bad = plan.__class__(**{**plan.__dict__, "full_kv_indices": plan.full_kv_indices[0]})
    with pytest.raises(ValueError, match="full_kv_indices"):
        plan_to_fa4_block_sparse(bad)
