"""FP8 (e4m3) path of the Triton block-sparse forward (``precision="fp8"``) under TRITON_INTERPRET=1.

The interpreter emulates e4m3 tensors and e4m3 x e4m3 -> fp32 dots exactly; its fp32 -> e4m3
*cast* mis-rounds when the mantissa carries into the exponent, so in-kernel casts of P go through
``_round_e4m3`` first there (``EMU_CAST``; tested here against torch's cast). Covered: the
quantisation prologue (scales, smoothing, layouts), the kernel's FP8 variant on every block-plan
path (full / partial blocks, in-kernel neighborhood rule, per-block masks, permutations, GQA, sub
tiles, ragged tails, kept_log_scale) against the float64 masked oracle, the LSE, and mutation
checks that a broken smoothing or scale fails the tolerance. Not covered on CPU: the GPU's
hardware cast and FP8 tensor-core MMA (the benchmark's accuracy rows cover those).
"""

import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import vidattn  # noqa: E402
from vidattn import Neighborhood, TokenLayout  # noqa: E402
from vidattn.errors import BackendUnsupported, TritonUnsupported  # noqa: E402
from vidattn.plan import Rectification  # noqa: E402

pytest.importorskip("triton")
from vidattn.kernels import quant_fp8  # noqa: E402
from vidattn.kernels.reference import block_sparse_attention_reference as reference  # noqa: E402
from vidattn.kernels.sparse_flash import block_sparse_attention_triton as triton_attn  # noqa: E402

from kernel_cases import StripeRule, per_head_permuted_plan  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a GPU", allow_module_level=True)
if quant_fp8.FP8_DTYPE is None:
    pytest.skip("torch has no float8_e4m3fn", allow_module_level=True)

# fp8 tolerance vs the exact (float64) oracle on Gaussian q, k, v: e4m3 keeps 3 mantissa bits, and
# the four quantised operands (Q, K, V, P) each add ~2.5% relative L2 (measured here: 4-8% in
# total, cosine >= 0.997, sharper rows worse); the bf16 kernel is at ~0.5%.
REL_L2_TOL = 0.10
COS_TOL = 0.995
LSE_MEAN_TOL = 0.10  # mean abs error of the natural-log LSE (measured <= 0.075; bf16 path: ~1e-3)
LSE_MAX_TOL = 1.0


def _qkv(B, S, H, Hk, D, seed, k_offset=0.0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, D, generator=g)
    k = torch.randn(B, S, Hk, D, generator=g) + k_offset * torch.randn(D, generator=g)  # per-channel offset
    v = torch.randn(B, S, Hk, D, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _errors(out, ref):
    o, r = out.double().flatten(), ref.double().flatten()
    return float((o - r).norm() / r.norm()), float(torch.nn.functional.cosine_similarity(o, r, dim=0))


def _check(q, k, v, plan, scale=None, rel_tol=REL_L2_TOL):
    out, lse = triton_attn(q, k, v, plan, scale=scale, return_lse=True, precision="fp8")
    ref, ref_lse = reference(q.double(), k.double(), v.double(), plan, scale=scale, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    rel, cos = _errors(out, ref)
    assert rel <= rel_tol and cos >= COS_TOL, (rel, cos)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    lse_err = (lse[fin] - ref_lse[fin]).abs()
    assert lse_err.mean().item() <= LSE_MEAN_TOL and lse_err.max().item() <= LSE_MAX_TOL, lse_err
    return rel, cos


import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from vidattn.kernels.quant_fp8 import _round_e4m3  # noqa: E402


@triton.jit
def _cast(X, Y, N: tl.constexpr):
    """``Y = float(e4m3(_round_e4m3(X)))``: the kernel's interpreter-path cast of P."""
    o = tl.arange(0, N)
    y = _round_e4m3(tl.load(X + o)).to(tl.float8e4nv)
    tl.store(Y + o, y.to(tl.float32))


# ----------------------------------------------------------------------------- quantisation prologue
def test_q_block_scales_follow_the_plan_order():
    """One scale per plan query block, cut through the plan's permutation; every block's largest
    |q| maps to exactly 448 and the dequantised q is within e4m3 rounding."""
    B, S, H, D, bq = 2, 40, 3, 16, 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, S, H, D, generator=g) * torch.linspace(0.1, 10, S)[None, :, None, None]
    perm = torch.stack([torch.randperm(S, generator=g) for _ in range(H)])
    q8, qs = quant_fp8.quantize_q_blocks(q, perm, bq)
    assert q8.dtype == quant_fp8.FP8_DTYPE and q8.shape == q.shape and qs.shape == (B, H, 3)
    qp = q.transpose(1, 2).gather(2, perm[None, :, :, None].expand(B, H, S, D))  # plan order
    q8p = q8.float().transpose(1, 2).gather(2, perm[None, :, :, None].expand(B, H, S, D))
    for blk in range(3):
        sl = slice(16 * blk, 16 * blk + 16)
        want = qp[:, :, sl].abs().amax((-1, -2)) / 448.0
        torch.testing.assert_close(qs[:, :, blk], want, rtol=1e-6, atol=0)
        assert torch.equal(q8p[:, :, sl].abs().amax((-1, -2)), torch.full((B, H), 448.0))
        deq = q8p[:, :, sl] * qs[:, :, blk, None, None]
        assert ((deq - qp[:, :, sl]).abs() <= qp[:, :, sl].abs() * 2 ** -4 + qs[:, :, blk, None, None] * 2 ** -9).all()


def test_k_smoothing_removes_the_token_mean():
    """k8 is quantised from k - mean_tokens(k): the mean is returned, the dequantised smoothed K
    has ~zero mean, and a per-(batch, head) shift of K changes neither k8 nor the scales."""
    B, Hk, S, D = 2, 2, 50, 16
    g = torch.Generator().manual_seed(1)
    k = torch.randn(B, Hk, S, D, generator=g)
    shift = 20 * torch.randn(B, Hk, 1, D, generator=g)
    k8, ks, km = quant_fp8.smooth_quantize_k(k + shift, 16)
    assert k8.shape == (B, Hk, S, D) and ks.shape == (B, Hk, 4) and km.shape == (B, Hk, D)
    torch.testing.assert_close(km, (k + shift).mean(2), rtol=0, atol=1e-5)
    k8b, ksb, _ = quant_fp8.smooth_quantize_k(k, 16)
    torch.testing.assert_close(ks, ksb, rtol=1e-4, atol=0)
    assert (k8.float() != k8b.float()).float().mean() < 0.02  # only rounding ties may move
    deq = k8.float() * ks.repeat_interleave(16, 2)[:, :, :S, None]
    assert deq.mean(2).abs().max() < 0.05
    smooth = k + shift - km[:, :, None]
    tok_scale = ks.repeat_interleave(16, 2)[:, :, :S, None]
    assert ((deq - smooth).abs() <= smooth.abs() * 2 ** -4 + tok_scale * 2 ** -9 + 1e-6).all()


def test_v_channel_scales_and_transposed_padded_layout():
    B, Hk, S, D = 1, 2, 37, 16
    g = torch.Generator().manual_seed(2)
    v = torch.randn(B, Hk, S, D, generator=g) * torch.logspace(-2, 2, D)
    vt8, vs = quant_fp8.quantize_v_channels(v)
    assert vt8.shape == (B, Hk, D, 48) and vs.shape == (B, Hk, D)
    assert torch.equal(vt8[..., S:].float(), torch.zeros(B, Hk, D, 48 - S))
    torch.testing.assert_close(vs, v.abs().amax(2) / 448.0, rtol=1e-6, atol=0)
    assert torch.equal(vt8.float()[..., :S].abs().amax(-1), torch.full((B, Hk, D), 448.0))
    deq = vt8.float()[..., :S].transpose(2, 3) * vs[:, :, None]
    assert ((deq - v).abs() <= v.abs() * 2 ** -4 + vs[:, :, None] * 2 ** -9).all()


def test_in_kernel_e4m3_rounding_matches_torch_cast():
    """The interpreter-only rounding of P (``_round_e4m3``) then the interpreter's cast give
    torch's round-to-nearest-even e4m3 value for every input in [0, 448] (subnormals included)."""
    g = torch.Generator().manual_seed(3)
    grid = quant_fp8.round_to_e4m3(torch.rand(1024, generator=g) * 448).unique()  # representable values
    x = torch.cat([torch.rand(2048, generator=g) * 448, torch.rand(1024, generator=g) * 0.02,
                   torch.exp2(-12 * torch.rand(1024, generator=g)), grid, torch.tensor([0.0, 448.0, 2 ** -9])])
    x = x[: 4096] if x.numel() >= 4096 else torch.nn.functional.pad(x, (0, 4096 - x.numel()))
    y = torch.empty_like(x)
    _cast[(1,)](x, y, 4096)
    assert torch.equal(y, quant_fp8.round_to_e4m3(x))


# ----------------------------------------------------------------------------- the kernel's FP8 variant
def test_dense_plan_with_ragged_tail_and_smoothing_needed():
    """Dense plan, ragged last key block, D not a power of two, K with a large per-channel offset
    (without smoothing e4m3 would spend its precision on the offset)."""
    layout = TokenLayout((3, 7), prefix=5)  # 26 tokens: ragged against 16
    plan = vidattn.Dense(block_size=16).plan(layout)
    q, k, v = _qkv(2, layout.seq_len, 2, 2, 24, seed=4, k_offset=8.0)
    _check(q, k, v, plan)


@pytest.mark.parametrize("mode", ["masks", "in_kernel"])
def test_neighborhood_partial_blocks_gqa_and_sub_tiles(monkeypatch, mode):
    """Partial blocks through both rule paths, GQA (2 query heads on 1 kv head), plan blocks of 32
    run as 16-row / 16-column sub tiles, heaviest-first program order, a ragged tail."""
    monkeypatch.setenv("VIDATTN_TRITON_BLOCK_M", "16")
    monkeypatch.setenv("VIDATTN_TRITON_BLOCK_N", "16")
    monkeypatch.setenv("VIDATTN_TRITON_SCHED", "1")
    if mode == "in_kernel":
        monkeypatch.setattr("vidattn.kernels.sparse_flash_tables.MASK_BUDGET_BYTES", 0)
    layout = TokenLayout((3, 6, 7), suffix=3)  # 129 tokens
    plan = Neighborhood(kernel_size=(3, 3, 5), dilation=(1, 2, 1), block_size=32).plan(layout)
    assert plan.has_partial
    q, k, v = _qkv(1, layout.seq_len, 2, 1, 32, seed=5, k_offset=3.0)
    _check(q, k, v, plan)


def test_token_permutation_tensor_descriptors_and_kept_log_scale():
    """A tiled token order (Q read / O written through the permutation, K/V gathered to plan
    order before quantising), tensor-descriptor loads of K and V^T, and a kept_log_scale bias."""
    layout = TokenLayout((3, 8, 9), suffix=5)
    plan = Neighborhood(kernel_size=(3, 3, 5), block_size=32, tile_shape=(2, 4, 4)).plan(layout)
    assert plan.perm is not None
    g = torch.Generator().manual_seed(6)
    rect = Rectification(kept_log_scale=0.5 * torch.randn(1, 1, plan.num_q_blocks, plan.num_k_blocks, generator=g))
    plan = dataclasses.replace(plan, rectification=rect)
    q, k, v = _qkv(2, layout.seq_len, 2, 1, 32, seed=6, k_offset=2.0, dtype=torch.float16)
    _check(q, k, v, plan, scale=0.3)


def test_generic_rule_per_head_permutation_fp32_inputs():
    S, H = 70, 3
    plan = per_head_permuted_plan(StripeRule(), S, H, block_q=16, block_k=32, seed=7)
    q, k, v = _qkv(1, S, H, 1, 16, seed=7, dtype=torch.float32)
    _check(q, k, v, plan)


def _roll(res, i):
    """``res`` with its ``i``-th tensor rolled by one along the last axis (a scale of the wrong block / channel)."""
    res = list(res)
    res[i] = res[i].roll(1, -1)
    return tuple(res)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grid=st.tuples(st.integers(3, 6), st.integers(4, 9)), kern=st.tuples(st.integers(1, 3), st.integers(1, 4)),
       dil=st.sampled_from([(1, 1), (1, 2)]), causal=st.sampled_from([(False, False), (True, False)]),
       text=st.integers(0, 3), heads=st.sampled_from([(2, 2), (2, 1)]), block=st.sampled_from([16, 32]),
       tiled=st.booleans(), seed=st.integers(0, 3))
def test_fp8_neighborhood_sweep(grid, kern, dil, causal, text, heads, block, tiled, seed):
    """fp8 on drawn 2-D neighborhoods: causal axes, dilation, text tokens (dense non-grid policy),
    GQA, 16/32 blocks, with and without a tiled token order."""
    kern = tuple(min(k, g // d) for k, g, d in zip(kern, grid, dil))
    tile = (2, 4) if tiled and block == 16 else None
    layout = TokenLayout(grid, suffix=text)
    plan = Neighborhood(kernel_size=kern, dilation=dil, is_causal=causal, block_size=block, tile_shape=tile).plan(layout)
    q, k, v = _qkv(1, layout.seq_len, heads[0], heads[1], 32, seed=seed, k_offset=2.0)
    _check(q, k, v, plan)


BROKEN = {  # name -> (quant_fp8 function replaced, replacement built from the original)
    "no smoothing": ("smooth_quantize_k", lambda f: _no_smoothing),
    "q scale of another block": ("quantize_q_blocks", lambda f: lambda q, p, b: _roll(f(q, p, b), 1)),
    "k scale of another block": ("smooth_quantize_k", lambda f: lambda k, b: _roll(f(k, b), 1)),
    "v scale of another channel": ("quantize_v_channels", lambda f: lambda v: _roll(f(v), 1)),
}


def _no_smoothing(k, block_k):
    """K quantised per block without subtracting the mean (the smoothing broken)."""
    kf = k.float()
    scale = (quant_fp8._block_amax(kf.abs().amax(-1), block_k) / 448.0).clamp_min(1e-12)
    tok = scale[:, :, torch.arange(k.shape[2]) // block_k]
    return quant_fp8._to_e4m3(kf / tok[..., None]).contiguous(), scale, torch.zeros_like(kf[:, :, 0])


@pytest.mark.parametrize("broken", list(BROKEN))
def test_a_broken_smoothing_or_scale_fails_the_tolerance(monkeypatch, broken):
    """Mutation check of the accuracy check: with the smoothing or one scale broken, :func:`_check`
    (output relative L2 / cosine, LSE) fails, while the intact path passes on the same data.
    Measured (rel L2, cos, mean |LSE err|): intact (0.078, 0.997, 0.07); no smoothing (0.14,
    0.990, 0.20); q scale rolled (0.09, 0.996, 0.46); k scale rolled (0.41, 0.92, 0.36); v scale
    rolled (0.65, 0.82, 0.07)."""
    layout = TokenLayout((4, 12))
    plan = Neighborhood(kernel_size=(3, 5), block_size=16).plan(layout)
    q, k, v = _qkv(1, layout.seq_len, 2, 2, 32, seed=8, k_offset=8.0)
    blocks = lambda f: torch.tensor(f).repeat_interleave(16)[None, :, None, None].to(q.dtype)  # noqa: E731
    q = q * blocks((0.5, 2.0, 1.0))  # query blocks of distinct scale
    k = k * blocks((1.0, 0.6, 1.4))  # key blocks of distinct scale
    v = v * torch.logspace(-1, 1, 32).to(v.dtype)  # channels of distinct scale
    _check(q, k, v, plan)  # intact
    name, wrap = BROKEN[broken]
    monkeypatch.setattr(quant_fp8, "DEFAULT_IMPL", "torch")  # the torch prologue (equal to the Triton one, tested below)
    monkeypatch.setattr(quant_fp8, name, wrap(getattr(quant_fp8, name)))
    with pytest.raises(AssertionError):
        _check(q, k, v, plan)


def test_warp_specialize_knob_keeps_results(monkeypatch):
    monkeypatch.setenv("VIDATTN_WARP_SPECIALIZE", "1")
    layout = TokenLayout((2, 20))
    plan = vidattn.Dense(block_size=16).plan(layout)
    q, k, v = _qkv(1, layout.seq_len, 2, 2, 16, seed=9)
    _check(q, k, v, plan)
    out = triton_attn(q, k, v, plan)
    ref = reference(q.float(), k.float(), v.float(), plan)
    assert (out.float() - ref).abs().max() < 3e-2


# ----------------------------------------------------------------------------- plumbing and refusals
def test_sparse_attention_precision_argument():
    layout = TokenLayout((4, 6))
    pat = Neighborhood(kernel_size=3, block_size=16)
    q, k, v = _qkv(1, layout.seq_len, 2, 2, 16, seed=10)
    out = vidattn.sparse_attention(q, k, v, pat, layout, backend="triton", precision="fp8")
    plan = pat.plan(layout)
    rel, cos = _errors(out, reference(q.double(), k.double(), v.double(), plan))
    assert rel <= REL_L2_TOL and cos >= COS_TOL
    assert not torch.equal(out, vidattn.sparse_attention(q, k, v, pat, layout, backend="triton"))  # really fp8
    with pytest.raises(ValueError, match="precision"):
        vidattn.sparse_attention(q, k, v, pat, layout, backend="triton", precision="int8")
    with pytest.raises(ValueError, match="precision"):
        triton_attn(q, k, v, plan, precision="bf16")
    with pytest.raises(BackendUnsupported, match="does not offer precision='fp8'"):
        vidattn.sparse_attention(q, k, v, pat, layout, backend="reference", precision="fp8")
    qg = q.clone().requires_grad_(True)
    with pytest.raises(BackendUnsupported, match="forward only"):
        vidattn.sparse_attention(qg, k, v, pat, layout, backend="triton", precision="fp8")


def test_pooled_rectification_is_refused():
    layout = TokenLayout((4, 8))
    plan = vidattn.Dense(block_size=16).plan(layout)
    nqb, nkb = plan.num_q_blocks, plan.num_k_blocks
    rect = Rectification(pooled_k=torch.randn(1, 1, nkb, 16), pooled_v=torch.randn(1, 1, nkb, 16),
                         pooled_log_weight=torch.zeros(1, 1, nqb, nkb))
    plan = dataclasses.replace(plan, rectification=rect)
    q, k, v = _qkv(1, layout.seq_len, 1, 1, 16, seed=11)
    with pytest.raises(TritonUnsupported, match="pooled"):
        triton_attn(q, k, v, plan, precision="fp8")


def test_capability_refusal(monkeypatch):
    """CUDA below compute capability 8.9 (and CPU outside the interpreter) refuse fp8 with the reason."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None: (8, 0))
    ok, why = quant_fp8.fp8_support(torch.device("cuda", 0))
    assert not ok and "compute capability >= 8.9, got 8.0" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None: (9, 0))
    assert quant_fp8.fp8_support(torch.device("cuda", 0)) == (True, "")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = quant_fp8.fp8_support(torch.device("cpu"))
    assert not ok and "CUDA" in why


def test_benchmark_fp8_rows_run_on_cpu(monkeypatch):
    """benchmarks/attention.py --precision fp8 end to end on a tiny shape under the interpreter
    (timing stubbed): every row is produced, accuracy rows carry fp8-vs-bf16 numbers."""
    from benchmarks import attention as bench

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "SHAPES", {"tiny": (1, 2, (4, 8), 3, 32)})
    monkeypatch.setattr(bench, "FP8_DENSITIES", (1.0, 0.25))
    monkeypatch.setattr(bench, "_bench", lambda fn: (fn(), 1.0)[1])
    records = []
    args = bench.argparse.Namespace(quick=False, skip_check=True, no_ws=False, fp8_part="all")
    bench.run_fp8(args, records.append)
    names = {r.get("name") for r in records}
    for want in ("triton-bf16-dense", "triton-fp8-dense", "triton-fp8-blocksparse-d0.25", "accuracy-dense",
                 "triton-fp8-dense-bn128-w8-s3", "triton-fp8-dense-ws-tma0", "sageattention-dense"):
        assert want in names, (want, names)
    rows = {r["name"]: r for r in records if "name" in r}
    assert "ms" in rows["triton-fp8-dense"] and "ms" in rows["triton-fp8-dense-ws-tma1"], rows
    acc = rows["accuracy-dense"]["fp8_vs_bf16"]
    assert acc["rel_l2"] < REL_L2_TOL and acc["cos"] > COS_TOL


@pytest.mark.parametrize("perm_heads", [0, 1, 3])
def test_triton_prologue_equals_torch_prologue(perm_heads):
    """The Triton quantisation kernels give bit-identical e4m3 tensors and scales to the torch
    reference (plan permutation shared or per head, ragged blocks, D not a power of two,
    non-contiguous inputs)."""
    B, S, H, Hk, D = 2, 45, 3, 3, 24
    g = torch.Generator().manual_seed(12)
    qkv = torch.randn(B, S, 3, H, D, generator=g).to(torch.bfloat16) * 3
    q = qkv[:, :, 0]
    k = (qkv[:, :, 1] + 4 * torch.randn(D, generator=g)).transpose(1, 2)  # [B, Hk, S, D] view
    v = qkv[:, :, 2].transpose(1, 2)
    perm = None if perm_heads == 0 else torch.stack([torch.randperm(S, generator=g) for _ in range(perm_heads)])
    a = quant_fp8.quantize_fp8_operands(q, k, v, perm, 16, 32, impl="triton")
    b = quant_fp8.quantize_fp8_operands(q, k, v, perm, 16, 32, impl="torch")
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.dtype == y.dtype and x.shape == y.shape, f.name
        assert torch.equal(x.float(), y.float()), f.name


def test_non_finite_values_propagate_through_the_fp8_path():
    """The dispatcher's non-finite semantics hold with precision='fp8' (its indicator passes run
    in fp8 too): a NaN value entry makes exactly that channel NaN in the rows that attend to it."""
    layout = TokenLayout((4, 6))
    pat = Neighborhood(kernel_size=3, block_size=16)
    q, k, v = _qkv(1, layout.seq_len, 2, 2, 16, seed=13)
    v[0, 7, 1, 5] = float("nan")
    out = vidattn.sparse_attention(q, k, v, pat, layout, backend="triton", precision="fp8")
    ref = vidattn.sparse_attention(q.double(), k.double(), v.double(), pat, layout, backend="reference")
    assert torch.equal(out.isnan(), ref.isnan()) and ref.isnan().any()
    fin = ~ref.isnan()
    rel, cos = _errors(out[fin], ref[fin])
    assert rel <= REL_L2_TOL and cos >= COS_TOL


def test_precision_context_manager_sets_the_default_and_restores_it():
    layout = TokenLayout((4, 6))
    pat = Neighborhood(kernel_size=3, block_size=16)
    q, k, v = _qkv(1, layout.seq_len, 2, 2, 16, seed=11)
    explicit = vidattn.sparse_attention(q, k, v, pat, layout, backend="triton", precision="fp8")
    plain = vidattn.sparse_attention(q, k, v, pat, layout, backend="triton")
    with vidattn.precision("fp8"):
        inside = vidattn.sparse_attention(q, k, v, pat, layout, backend="triton")
        with vidattn.precision(None):  # nested: back to the inputs' dtype
            assert torch.equal(vidattn.sparse_attention(q, k, v, pat, layout, backend="triton"), plain)
        with pytest.raises(BackendUnsupported, match="does not offer precision='fp8'"):
            vidattn.sparse_attention(q, k, v, pat, layout, backend="reference")
    assert torch.equal(inside, explicit) and not torch.equal(inside, plain)
    assert torch.equal(vidattn.sparse_attention(q, k, v, pat, layout, backend="triton"), plain)  # restored
    with pytest.raises(ValueError, match="precision"):
        with vidattn.precision("int8"):
            pass


def test_fp8_full_block_plans_launch_128_key_tiles(monkeypatch):
    # the H200 sweep's fastest fp8 setting for full blocks (benchmarks/RESULTS.md, session 5); bf16
    # and masked fp8 plans keep 64-key tiles at d = 128
    from vidattn.kernels import sparse_flash_launch as launch
    from vidattn.kernels.sparse_flash_kernel import RuleMode

    monkeypatch.setattr(launch, "interpreting", lambda: False)
    plan = vidattn.Dense(block_size=128).plan(TokenLayout((4, 8, 8)))
    cfg = lambda **kw: launch.launch_config(plan, 128, torch.bfloat16, kw.pop("mode", RuleMode.NONE), **kw)  # noqa: E731
    assert (cfg(fp8=True)["BLOCK_N"], cfg()["BLOCK_N"]) == (128, 64)
    assert cfg(fp8=True, mode=RuleMode.NEIGHBORHOOD)["BLOCK_N"] == 64
