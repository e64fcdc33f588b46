"""One non-finite behaviour on every backend (reference, cpu, flex, triton under the interpreter):
NaN only where the math puts it; fully masked rows are 0 (LSE -inf); a non-finite scale is an
error. Expected values come from a float64 dense masked oracle."""

import math
import warnings

import pytest
import torch

import vidattn
from vidattn import Neighborhood, TokenLayout
from vidattn.plan import FULL, plan_from_block_mask

BACKENDS = ["reference", "cpu", "flex", "triton"]
LAY = TokenLayout((8, 16))  # 128 tokens, two 64-token blocks
PAT = Neighborhood(kernel_size=(3, 5))


def oracle(q, k, v, mask):
    qh, kh, vh = (t.transpose(1, 2).double() for t in (q, k, v))
    s = torch.einsum("bhqd,bhkd->bhqk", qh, kh) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~mask, -math.inf), -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", p, vh).transpose(1, 2)


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, LAY.seq_len, 2, 16, generator=g) for _ in range(3))


def _run(q, k, v, backend, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vidattn.sparse_attention(q, k, v, PAT, LAY, backend=backend, **kw)


def _mask():
    return PAT.mask(LAY)[None]  # [1, 1, S, S]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_value_token_reaches_only_rows_that_attend_it(backend):
    q, k, v = _qkv()
    j, c = 70, 3
    v0 = v.clone()
    v[0, j, 1, c] = float("nan")
    out = _run(q, k, v, backend)
    v0[0, j, 1, c] = 0.0  # what the non-NaN entries see: the rest of v unchanged
    expect = oracle(q, k, v0, _mask())
    rows = _mask()[0, 0, :, j]  # queries that attend key j
    assert 0 < int(rows.sum()) < LAY.seq_len
    expect[0, rows, 1, c] = float("nan")
    assert torch.equal(out.isnan(), expect.isnan())
    torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_query_row_and_inf_key_token(backend):
    q, k, v = _qkv(1)
    i, j = 5, 100
    q[0, i, 0, 2] = float("nan")
    k0 = k.clone()
    k[0, j, 1, 0] = float("inf")
    out, lse = _run(q, k, v, backend, return_lse=True)
    q0 = q.clone()
    q0[0, i, 0] = 0.0
    k0[0, j, 1] = 0.0
    expect = oracle(q0, k0, v, _mask())
    expect[0, i, 0] = float("nan")  # the NaN query row, head 0 only
    rows = _mask()[0, 0, :, j]
    expect[0, rows, 1] = float("nan")  # every row of head 1 attending the inf key
    assert torch.equal(out.isnan(), expect.isnan())
    torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert lse[0, 0, i].isnan() and lse[0, 1, rows].isnan().all()
    assert torch.isfinite(lse[0, 1, ~rows]).all() and torch.isfinite(lse[0, 0, :i]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero(backend):
    S = 64
    cls = torch.full((1, 1, 4, 4), FULL, dtype=torch.int8)
    cls[0, 0, 1] = 0  # query block 1 attends nothing
    plan = plan_from_block_mask(cls, seq_len=S, block_q=16, block_k=16, rule=None, token_density=0.75)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, S, 1, 16, generator=g) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, lse = vidattn.run_plan(q, k, v, plan, backend=backend, return_lse=True)
    assert torch.equal(out[0, 16:32], torch.zeros_like(out[0, 16:32]))
    assert torch.isneginf(lse[0, 0, 16:32]).all() and torch.isfinite(lse[0, 0, :16]).all()
    mask = plan.token_mask()
    torch.testing.assert_close(out.double(), oracle(q, k, v, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale_is_rejected(scale):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="scale must be finite"):
        _run(q, k, v, "reference", scale=scale)
    with pytest.raises(ValueError, match="scale must be finite"):
        vidattn.run_plan(q, k, v, PAT.plan(LAY), backend="cpu", scale=scale)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_large_finite_values_whose_sum_overflows_are_not_treated_as_non_finite(backend):
    # the finiteness pass sums each input; here v's float32 sum overflows to inf although every
    # entry is finite: the result must still be the plain attention output, with no NaN
    q, k, v = _qkv(3)
    v[0, 0, :, 0] = 2.0e38  # one entry per head: no row's own sums overflow
    assert not torch.isfinite(v.sum(dtype=torch.float32)) and torch.isfinite(v).all()
    out = _run(q, k, v, backend)
    expect = oracle(q, k, v, _mask())
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), expect, atol=1e-5, rtol=1e-5)
