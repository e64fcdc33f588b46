"""vidattn.na1d/na2d/na3d against NATTEN itself: full functional signature, additional keys,
return_lse, backend/tile keywords, and torch.compile(fullgraph=True)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings, strategies as st

import vidattn

from natten_cases import draw_na_axes

natten = pytest.importorskip("natten")

OURS = {1: vidattn.na1d, 2: vidattn.na2d, 3: vidattn.na3d}
THEIRS = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}


@st.composite
def natten_case(draw):
    grid, k, d, s, c = draw_na_axes(draw, kernel=(2, 4), dilation=(1, 2), slack=(5, 2))
    extra = draw(st.sampled_from([0, 0, 1, 7]))
    heads = draw(st.sampled_from([(2, 2), (4, 2)]))
    return grid, k, d, s, c, extra, heads


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=natten_case(), scale=st.sampled_from([None, 0.3]))
def test_matches_natten_with_additional_keys_and_lse(case, scale):
    grid, k, d, s, c, extra, (H, Hk) = case
    n = len(grid)
    g = torch.Generator().manual_seed(math.prod(grid) + extra)
    q = torch.randn(2, *grid, H, 8, generator=g)
    kk, v = (torch.randn(2, *grid, Hk, 8, generator=g) for _ in range(2))
    add = {}
    if extra:
        add = dict(additional_keys=torch.randn(2, extra, Hk, 8, generator=g),
                   additional_values=torch.randn(2, extra, Hk, 8, generator=g))
    try:
        a, la = THEIRS[n](q, kk, v, kernel_size=k, stride=s, dilation=d, is_causal=c, scale=scale, return_lse=True,
                          **add)
    except (NotImplementedError, ValueError):  # NATTEN has no CPU path for this case (e.g. GQA, kernel == grid)
        reject()
    b, lb = OURS[n](q, kk, v, kernel_size=k, stride=s, dilation=d, is_causal=c, scale=scale, return_lse=True, **add)
    assert b.shape == a.shape and lb.shape == la.shape == q.shape[:-1]
    assert (a - b).abs().max().item() <= 1e-4
    assert (la - lb).abs().max().item() <= 1e-4
    # without return_lse: the output alone, identical
    assert torch.equal(OURS[n](q, kk, v, kernel_size=k, stride=s, dilation=d, is_causal=c, scale=scale, **add), b)


def test_natten_backend_names_tiles_and_tuning_keywords_are_accepted():
    q, k, v = (torch.randn(1, 8, 12, 2, 8) for _ in range(3))
    ref = natten.na2d(q, k, v, kernel_size=(3, 5), stride=(1, 2))
    for backend in (None, "cutlass-fna", "hopper-fna", "blackwell-fna", "flex-fna", "reference", "auto"):
        out = vidattn.na2d(q, k, v, kernel_size=(3, 5), stride=(1, 2), backend=backend, q_tile_shape=(4, 4),
                           kv_tile_shape=(4, 4), backward_q_tile_shape=(4, 4), backward_kv_tile_shape=(4, 4),
                           backward_kv_splits=(1, 1), backward_use_pt_reduction=True, run_persistent_kernel=False,
                           kernel_schedule="coop", torch_compile=False, attention_kwargs={"backend": "flex-fmha"})
        assert (out - ref).abs().max().item() <= 1e-4, backend
    with pytest.raises(ValueError, match="backend"):
        vidattn.na2d(q, k, v, kernel_size=3, backend="cuda-fna")
    with pytest.raises(ValueError, match="q_tile_shape"):
        vidattn.na2d(q, k, v, kernel_size=3, q_tile_shape=(4, 4, 4))


def test_q_tile_shape_sets_the_plan_tiles():
    from vidattn.natten_compat import _pattern

    q = torch.randn(1, 8, 16, 2, 8)
    vidattn.na2d(q, q, q, kernel_size=3, q_tile_shape=(2, 8))
    plan = _pattern((3, 3), (1, 1), (1, 1), (False, False), (2, 8)).plan(vidattn.TokenLayout((8, 16)))
    assert plan.block_q == 16 and plan.meta["tile_shape"] == [2, 8]


def test_additional_keys_errors_name_the_argument():
    q = torch.randn(1, 10, 2, 8)
    with pytest.raises(ValueError, match="additional_values"):
        vidattn.na1d(q, q, q, kernel_size=3, additional_keys=torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match="additional_keys"):
        vidattn.na1d(q, q, q, kernel_size=3, additional_keys=torch.randn(1, 4, 3, 8),
                     additional_values=torch.randn(1, 4, 3, 8))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_torch_compile_fullgraph_matches_eager_and_natten(n):
    grid = {1: (20,), 2: (6, 7), 3: (3, 4, 5)}[n]
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, *grid, 2, 8, generator=g) for _ in range(3))
    ak, av = torch.randn(1, 3, 2, 8, generator=g), torch.randn(1, 3, 2, 8, generator=g)

    def fn(q, k, v):
        return OURS[n](q, k, v, kernel_size=3, stride=2, is_causal=(n == 1), additional_keys=ak,
                       additional_values=av, return_lse=True, backend="hopper-fna")

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")  # dynamo + AOT autograd, no C++ build
    out, lse = compiled(q, k, v)
    ref, ref_lse = THEIRS[n](q, k, v, kernel_size=3, stride=2, is_causal=(n == 1), additional_keys=ak,
                             additional_values=av, return_lse=True)
    assert (out - ref).abs().max().item() <= 1e-4 and (lse - ref_lse).abs().max().item() <= 1e-4
    # gradients through the compiled graph equal eager autograd
    qs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    qe = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o1, l1 = compiled(*qs)
    (o1.square().sum() + l1.sum()).backward()
    o2, l2 = fn(*qe)
    (o2.square().sum() + l2.sum()).backward()
    for a, b in zip(qs, qe):
        assert (a.grad - b.grad).abs().max().item() <= 1e-4
