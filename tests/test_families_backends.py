"""Radial, PermutedGrid and RectifiedSparse on every backend (reference, flex, triton, auto):
each equals the independent masked-SDPA reference (or the reference executor for rectified
plans). The authors' rectification is an output epilogue every backend gets from run_plan; the
joint method's fused terms FlexAttention cannot run: it must fall back."""

import warnings

import pytest
import torch

import vidattn
from vidattn import TokenLayout

from vidattn_testutils import dense_masked_attention

BACKENDS = ["reference", "flex", "triton", "auto"]


def _run(q, k, v, pat, lay, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vidattn.sparse_attention(q, k, v, pat, lay, backend=backend)


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(7)
    lay = TokenLayout((6, 4, 4), prefix=3, suffix=2)
    S = lay.seq_len
    q = torch.randn(1, S, 2, 16, generator=gen)
    k, v = (torch.randn(1, S, 2, 16, generator=gen) for _ in range(2))
    return lay, q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
def test_radial_backends(data, backend):
    lay, q, k, v = data
    pat = vidattn.Radial(block_size=8, decay_factor=0.5)
    out = _run(q, k, v, pat, lay, backend)
    ref = dense_masked_attention(q, k, v, pat.mask(lay))
    torch.testing.assert_close(out.double(), ref, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_permuted_grid_backends(data, backend):
    lay, q, k, v = data
    # sharpen head 0 onto same-frame keys so the plan mixes a permuted sparse head and a dense one
    T, H, W = lay.grid
    g = torch.arange(T * H * W)
    e = torch.nn.functional.one_hot(g // (H * W), 16).float() * 6
    q, k = q.clone(), k.clone()
    q[0, lay.grid_slice, 0], k[0, lay.grid_slice, 0] = e, e
    pat = vidattn.PermutedGrid(block_size=8, grid_strides=(4,))
    plan = pat.plan(lay, q, k)
    assert plan.meta["head_patterns"] == ["spatial", "dense"]
    out = _run(q, k, v, pat, lay, backend)
    ref = dense_masked_attention(q, k, v, plan.token_mask()[0])
    torch.testing.assert_close(out.double(), ref, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rectify", [False, True])
@pytest.mark.parametrize("method", ["authors", "joint"])
def test_rectified_backends(data, backend, rectify, method):
    lay, q, k, v = data
    pat = vidattn.RectifiedSparse(keep=0.4, rectify=rectify, block_size=8, method=method)
    plan = pat.plan(lay, q, k, v=v)
    assert (plan.rectification is not None) == rectify
    want = vidattn.run_plan(q, k, v, plan, backend="reference")
    out = _run(q, k, v, pat, lay, backend)
    torch.testing.assert_close(out, want, atol=5e-5, rtol=1e-4)
    if not rectify:  # no rectification terms: plain masked attention on the selected blocks
        ref = dense_masked_attention(q, k, v, plan.token_mask()[0])
        torch.testing.assert_close(out.double(), ref, atol=5e-5, rtol=1e-4)


def test_flex_falls_back_for_fused_rectification_only(data):
    lay, q, k, v = data
    from vidattn.attention import _warned

    _warned.clear()
    with pytest.warns(RuntimeWarning, match="falling back to 'reference'"):
        vidattn.sparse_attention(q, k, v, vidattn.RectifiedSparse(keep=0.4, block_size=8, method="joint"), lay,
                                 backend="flex")
    _warned.clear()
    with warnings.catch_warnings():  # the authors' epilogue plan runs on flex itself
        warnings.simplefilter("error", RuntimeWarning)
        warnings.filterwarnings("ignore", message=".*(flex_attention|return_lse).*")
        vidattn.sparse_attention(q, k, v, vidattn.RectifiedSparse(keep=0.4, block_size=8), lay, backend="flex")


def test_public_names():
    assert vidattn.Radial is vidattn.patterns.Radial
    assert vidattn.PermutedGrid is vidattn.patterns.PermutedGrid
    assert vidattn.RectifiedSparse is vidattn.patterns.RectifiedSparse
    p = vidattn.RectifiedSparse(keep=0.5, rectify=False)
    assert p.block_size == 128 and vidattn.PermutedGrid().block_size == 128


def test_triton_kernel_runs_every_family():
    """Block 16 (the fused kernel's minimum): the Triton kernel itself (interpreter on CPU) runs
    each family's plan (in-kernel rule masks, per-head perm, per-sample rectification) without
    falling back, and matches the reference executor."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(11)
    lay = TokenLayout((6, 4, 8), prefix=3, suffix=2)
    S = lay.seq_len
    q, k, v = (torch.randn(2, S, 2, 16, generator=gen) for _ in range(3))
    pats = (vidattn.Radial(block_size=16, decay_factor=0.5), vidattn.Radial(block_size=16, granularity="block"),
            vidattn.PermutedGrid(block_size=16), vidattn.RectifiedSparse(keep=0.4, block_size=16, method="joint"),
            vidattn.RectifiedSparse(keep=0.4, block_size=16))
    from vidattn.attention import backend_plan
    from vidattn.kernels.reference import block_sparse_attention_reference
    from vidattn.kernels.sparse_flash import block_sparse_attention_triton  # raises TritonUnsupported, no fallback

    for pat in pats:
        plan = backend_plan(pat.plan(lay, q, k, v, num_heads=2))  # what run_plan hands a backend
        out = block_sparse_attention_triton(q, k, v, plan)
        want = block_sparse_attention_reference(q, k, v, plan)
        torch.testing.assert_close(out, want, atol=5e-5, rtol=1e-4)
