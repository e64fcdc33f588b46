"""Bad input is a clear TypeError / ValueError naming the argument (issue 20's validation gaps),
and float64 is computed in float64 (reference, cpu) or refused by name (triton)."""

import warnings

import pytest
import torch

import vidattn
from vidattn import Dense, Neighborhood, TokenLayout
from vidattn import backends

LAY = TokenLayout((4, 8))


def _qkv(B=1, S=32, H=2, D=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, S, H, D, generator=g).to(dtype) for _ in range(3))


@pytest.mark.parametrize("bad, err", [(0, ValueError), (-8, ValueError), (2.5, TypeError), (True, TypeError),
                                      ("64", TypeError)])
def test_dense_block_size(bad, err):
    with pytest.raises(err, match="block_size"):
        Dense(block_size=bad)


@pytest.mark.parametrize("shape, what", [((1, 32, 0, 16), "heads"), ((1, 32, 2, 0), "head dim"),
                                         ((0, 32, 2, 16), "batch size")])
def test_empty_dims(shape, what):
    q = torch.randn(*shape)
    with pytest.raises(ValueError, match=what):
        vidattn.sparse_attention(q, q, q, Dense(), LAY)


@pytest.mark.parametrize("scale", ["0.5", torch.tensor(0.5), True, None.__class__])
def test_scale_type(scale):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="scale"):
        vidattn.sparse_attention(q, k, v, Dense(), LAY, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int32])
def test_float8_and_int_rejected(dtype):
    q = torch.zeros(1, 32, 2, 16).to(dtype)
    with pytest.raises(TypeError, match="q must be float16/bfloat16/float32/float64"):
        vidattn.sparse_attention(q, q, q, Dense(), LAY)


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex"])
def test_float64_is_computed_in_float64(backend):
    q, k, v = _qkv(dtype=torch.float64)
    pat = Neighborhood(kernel_size=(3, 3))
    out = vidattn.sparse_attention(q, k, v, pat, LAY, backend=backend)
    assert out.dtype == torch.float64
    m = pat.mask(LAY)[None]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * 16 ** -0.5
    ref = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s.masked_fill(~m, float("-inf")), -1), v)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)  # float32 math would miss by ~1e-7


def test_triton_refuses_float64_by_name():
    q, k, v = _qkv(dtype=torch.float64)
    plan = Dense(block_size=16).plan(LAY)
    ok, why = backends.get_backend("triton").can_run(plan, q, k, v)
    assert not ok and "float64" in why
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = vidattn.run_plan(q, k, v, plan, backend="triton")
    assert out.dtype == torch.float64
    assert any("float64" in str(w.message) for w in rec)


def test_plan_block_sizes_checked():
    from vidattn.plan import FULL, plan_from_block_mask

    cls = torch.full((1, 1, 1, 1), FULL, dtype=torch.int8)
    with pytest.raises(ValueError, match="block_q"):
        plan_from_block_mask(cls, seq_len=16, block_q=0, block_k=16, rule=None, token_density=1.0)
