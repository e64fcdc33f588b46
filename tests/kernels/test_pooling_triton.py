"""Fused Triton block pooling vs the PyTorch reference (CPU, TRITON_INTERPRET=1)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

pytest.importorskip("triton")
from vidattn.kernels import pooling  # noqa: E402
from vidattn.kernels.pooling_triton import STAT_MAD, STAT_NONE, STAT_VAR, block_pool_triton  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)


@settings(max_examples=8, deadline=None)
@given(S=st.integers(1, 90), H=st.integers(1, 3), D=st.sampled_from([8, 16, 24]), block=st.sampled_from([16, 32]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), use_perm=st.booleans(), per_head=st.booleans(),
       seed=st.integers(0, 3))
def test_block_pool_matches_reference(S, H, D, block, dtype, use_perm, per_head, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(2, S, H + 1, D, generator=g).to(dtype)
    x = base[:, :, 1:]  # non-contiguous view
    perm = None
    if use_perm:
        perm = torch.stack([torch.randperm(S, generator=g) for _ in range(H if per_head else 1)])
    ref_mean, ref_mad = pooling.block_mean_absdev(x, block, perm)
    _, ref_var = pooling.block_moments(x, block, perm)
    mean, none = block_pool_triton(x, block, perm, STAT_NONE)
    assert none is None
    _, mad = block_pool_triton(x, block, perm, STAT_MAD)
    _, var = block_pool_triton(x, block, perm, STAT_VAR)
    for got, ref in ((mean, ref_mean), (mad, ref_mad), (var, ref_var)):
        assert got.shape == ref.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_block_pool_rejects_bad_block():
    x = torch.randn(1, 40, 2, 16)
    with pytest.raises(ValueError, match="block"):
        block_pool_triton(x, 24)
    with pytest.raises(ValueError, match="perm"):
        block_pool_triton(x, 16, torch.arange(39)[None])
