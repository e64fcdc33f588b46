"""Neighborhood attention: mask semantics, plan execution on every CPU backend, NATTEN parity."""

import itertools
import math

import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings, strategies as st

import vidattn
from vidattn_testutils import dense_masked_attention
from vidattn import Neighborhood, TokenLayout


def brute_force_window(n, k, d, s, causal, a):
    """Keys (coordinates) that query coordinate ``a`` attends on one axis, written from the NATTEN
    docs' definition with plain Python loops (independent of the vectorised rule)."""
    g = a % d
    members = [x for x in range(n) if x % d == g]  # the dilation group, in order
    pos = members.index(a)
    n_g = len(members)
    first = (pos // s) * s
    if causal:
        leader = min(first + s - 1, n_g - 1)
        keys = [members[b] for b in range(n_g) if b <= pos and leader - b < k]
    else:
        leader = min(first + s // 2, n_g - 1)
        start = min(max(leader - k // 2, 0), n_g - k)
        keys = [members[b] for b in range(start, start + k)]
    return set(keys)


def brute_force_mask(layout, k, d, s, c):
    S = layout.seq_len
    m = torch.ones(S, S, dtype=torch.bool)
    coords = list(itertools.product(*[range(g) for g in layout.grid]))
    p = layout.prefix
    for qi, qc in enumerate(coords):
        wins = [brute_force_window(layout.grid[a], k[a], d[a], s[a], c[a], qc[a]) for a in range(layout.ndim)]
        for ki, kc in enumerate(coords):
            m[p + qi, p + ki] = all(kc[a] in wins[a] for a in range(layout.ndim))
    return m


@st.composite
def na_case(draw, max_tokens=160):
    ndim = draw(st.integers(1, 3))
    k, d, s, c, grid = [], [], [], [], []
    for _ in range(ndim):
        ka = draw(st.integers(1, 5))
        da = draw(st.integers(1, 2))
        ga = draw(st.integers(ka * da, ka * da + (6 if ndim < 3 else 3)))
        k.append(ka), d.append(da), s.append(draw(st.integers(1, ka))), c.append(draw(st.booleans())), grid.append(ga)
    if math.prod(grid) > max_tokens:
        grid = [ka * da for ka, da in zip(k, d)]
    prefix = draw(st.integers(0, 3))
    suffix = draw(st.integers(0, 3))
    block = draw(st.sampled_from([8, 16, 32]))
    return TokenLayout(tuple(grid), prefix, suffix), tuple(k), tuple(d), tuple(s), tuple(c), block


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=na_case())
def test_mask_matches_brute_force_definition(case):
    layout, k, d, s, c, block = case
    pat = Neighborhood(kernel_size=k, dilation=d, stride=s, is_causal=c, block_size=block)
    m = pat.mask(layout)[0]
    ref = brute_force_mask(layout, k, d, s, c)
    assert torch.equal(m, ref)
    # the plan executes exactly the mask (tiling + full/partial classification)
    assert torch.equal(pat.plan(layout).token_mask()[0, 0], m)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=na_case(max_tokens=120), heads=st.sampled_from([(2, 2), (4, 2), (3, 1)]), batch=st.integers(1, 2))
def test_reference_and_flex_equal_dense_sdpa_with_mask(case, heads, batch):
    layout, k, d, s, c, block = case
    H, Hk = heads
    pat = Neighborhood(kernel_size=k, dilation=d, stride=s, is_causal=c, block_size=block)
    S = layout.seq_len
    g = torch.Generator().manual_seed(S * 7 + H)
    q = torch.randn(batch, S, H, 16, generator=g)
    kk = torch.randn(batch, S, Hk, 16, generator=g)
    v = torch.randn(batch, S, Hk, 16, generator=g)
    ref = dense_masked_attention(q, kk, v, pat.mask(layout))
    out = vidattn.sparse_attention(q, kk, v, pat, layout, backend="reference")
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert (out.double() - ref).abs().max().item() <= 1e-5
    out_flex = vidattn.sparse_attention(q, kk, v, pat, layout, backend="flex")
    assert (out_flex - out).abs().max().item() <= 1e-5


def test_return_lse_matches_logsumexp():
    layout = TokenLayout((6, 7), prefix=2)
    pat = Neighborhood(kernel_size=3, dilation=(1, 2), block_size=16)
    S = layout.seq_len
    q, k, v = (torch.randn(1, S, 2, 8) for _ in range(3))
    out, lse = vidattn.sparse_attention(q, k, v, pat, layout, backend="reference", scale=0.3, return_lse=True)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 0.3
    logits = logits.masked_fill(~pat.mask(layout)[None], -math.inf)
    assert lse.shape == (1, 2, S)
    assert torch.allclose(lse.double(), torch.logsumexp(logits, -1), atol=1e-5)
    _, lse_flex = vidattn.sparse_attention(q, k, v, pat, layout, backend="flex", scale=0.3, return_lse=True)
    assert torch.allclose(lse_flex, lse, atol=1e-4)


def test_dense_pattern_equals_sdpa_and_bf16_runs():
    layout = TokenLayout((5, 6), prefix=3, suffix=2)
    S = layout.seq_len
    q, k, v = (torch.randn(2, S, 2, 16) for _ in range(3))
    out = vidattn.sparse_attention(q, k, v, vidattn.Dense(block_size=16), layout, backend="reference")
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert (out - ref).abs().max() < 1e-5
    assert vidattn.Dense().mask(layout).all()
    out16 = vidattn.sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), vidattn.Dense(), layout, backend="auto")
    assert out16.dtype == torch.bfloat16 and (out16.float() - ref).abs().max() < 3e-2


def test_kernel_covering_grid_is_dense():
    layout = TokenLayout((3, 4, 5), prefix=1, suffix=1)
    pat = Neighborhood(kernel_size=(3, 4, 5), block_size=16)
    assert pat.mask(layout).all()
    plan = pat.plan(layout)
    assert plan.token_density == 1.0 and not plan.has_partial


def test_plan_is_cached_and_reports_density():
    layout = TokenLayout((16, 128))
    pat = Neighborhood(kernel_size=5, block_size=32)
    p1 = pat.plan(layout)
    assert pat.plan(layout) is p1
    assert abs(p1.token_density - pat.mask(layout).float().mean().item()) < 1e-9
    # tiling makes blocks compact: far fewer computed blocks than a row-major order
    raw = Neighborhood(kernel_size=5, block_size=32, tile_shape=False).plan(layout)
    assert p1.block_density < raw.block_density
    assert p1.block_density >= p1.token_density


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=na_case(max_tokens=140))  # more NATTEN cases: tests/test_natten_compat.py
def test_na_functions_match_natten(case):
    natten = pytest.importorskip("natten")
    layout, k, d, s, c, _ = case
    if any(ka < 2 for ka in k):  # NATTEN requires kernel_size >= 2
        k = tuple(max(2, ka) for ka in k)
        s = tuple(min(sa, ka) for sa, ka in zip(s, k))
        grid = tuple(max(g, ka * da) for g, ka, da in zip(layout.grid, k, d))
    else:
        grid = layout.grid
    n = len(grid)
    g = torch.Generator().manual_seed(sum(grid))
    q, kk, v = (torch.randn(2, *grid, 2, 16, generator=g) for _ in range(3))
    ours = {1: vidattn.na1d, 2: vidattn.na2d, 3: vidattn.na3d}[n]
    theirs = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[n]
    try:
        a = theirs(q, kk, v, kernel_size=k, stride=s, dilation=d, is_causal=c)
    except NotImplementedError:  # NATTEN has no CPU backend for this case (e.g. kernel == grid -> its FMHA path)
        reject()
    b = ours(q, kk, v, kernel_size=k, stride=s, dilation=d, is_causal=c)
    assert b.shape == a.shape
    assert (a - b).abs().max().item() <= 1e-4


def test_na_scale_and_int_args_match_natten():
    natten = pytest.importorskip("natten")
    q, k, v = (torch.randn(1, 7, 9, 2, 8) for _ in range(3))
    a = natten.na2d(q, k, v, kernel_size=3, dilation=2, stride=2, is_causal=True, scale=0.5)
    b = vidattn.na2d(q, k, v, kernel_size=3, dilation=2, stride=2, is_causal=True, scale=0.5)
    assert (a - b).abs().max().item() <= 1e-4


def test_errors_name_the_argument():
    layout = TokenLayout((4, 5))
    S = layout.seq_len
    q = torch.randn(1, S, 2, 8)
    with pytest.raises(ValueError, match="kernel_size"):  # grid smaller than the kernel
        vidattn.sparse_attention(q, q, q, Neighborhood(kernel_size=7), layout)
    with pytest.raises(ValueError, match="kernel_size"):
        vidattn.na2d(torch.randn(1, 4, 5, 2, 8), torch.randn(1, 4, 5, 2, 8), torch.randn(1, 4, 5, 2, 8), kernel_size=3,
                     dilation=2)
    with pytest.raises(ValueError, match="stride"):
        Neighborhood(kernel_size=3, stride=4).mask(layout)
    with pytest.raises(ValueError, match="axes"):
        Neighborhood(kernel_size=(3, 3, 3)).mask(layout)
    with pytest.raises(TypeError, match="kernel_size"):
        Neighborhood(kernel_size=2.5)
    with pytest.raises(ValueError, match="kernel_size"):
        Neighborhood(kernel_size=0)
    with pytest.raises(TypeError, match="is_causal"):
        Neighborhood(kernel_size=3, is_causal=1)
    with pytest.raises(ValueError, match="does not match the layout"):
        vidattn.sparse_attention(q[:, :-1], q[:, :-1], q[:, :-1], Neighborhood(kernel_size=3), layout)
    with pytest.raises(ValueError, match=r"\[B, S, heads, D\]"):
        vidattn.sparse_attention(q[0], q[0], q[0], Neighborhood(kernel_size=3), layout)
    with pytest.raises(TypeError, match="float"):
        qi = torch.ones(1, S, 2, 8, dtype=torch.long)
        vidattn.sparse_attention(qi, qi, qi, Neighborhood(kernel_size=3), layout)
    with pytest.raises(ValueError, match="divide"):
        vidattn.sparse_attention(torch.randn(1, S, 3, 8), q, q, Neighborhood(kernel_size=3), layout)
    with pytest.raises(ValueError, match="backend"):
        vidattn.sparse_attention(q, q, q, Neighborhood(kernel_size=3), layout, backend="cuda")
    with pytest.raises(TypeError, match="pattern"):
        vidattn.sparse_attention(q, q, q, "neighborhood", layout)
    with pytest.raises(ValueError, match="query"):
        vidattn.na1d(torch.randn(1, 4, 5, 2, 8), torch.randn(1, 4, 5, 2, 8), torch.randn(1, 4, 5, 2, 8), kernel_size=3)


def test_reference_handles_32k_tokens_memory_bounded():
    """Chunked reference: a Wan-like 3-D grid runs without S x S memory (small head dim)."""
    layout = TokenLayout((6, 20, 26))  # 3,120 tokens
    pat = Neighborhood(kernel_size=(3, 5, 7))
    S = layout.seq_len
    q, k, v = (torch.randn(1, S, 2, 16) for _ in range(3))
    out = vidattn.sparse_attention(q, k, v, pat, layout, backend="reference")
    # spot-check a few query rows against a direct computation
    m = pat.mask(layout)[0]
    for i in (0, 777, S - 1):
        keys = m[i].nonzero().flatten()
        att = torch.softmax(torch.einsum("hd,khd->hk", q[0, i], k[0, keys]) / 4.0, -1)
        ref = torch.einsum("hk,khd->hd", att, v[0, keys])
        assert (out[0, i] - ref).abs().max() < 1e-5
