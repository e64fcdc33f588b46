"""Analytic (O(blocks)) neighborhood plan construction against the token-level construction."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from vidattn import Neighborhood, TokenLayout
from vidattn.patterns.neighborhood import NeighborhoodRule
from vidattn.patterns.neighborhood_plan import neighborhood_plan_analytic
from vidattn.plan import plan_from_rule

from natten_cases import draw_na_axes


@st.composite
def plan_case(draw):
    grid, k, d, s, c = draw_na_axes(draw, kernel=(1, 5), dilation=(1, 3), slack=(7, 3))
    layout = TokenLayout(grid, draw(st.integers(0, 5)), draw(st.integers(0, 5)))
    block = draw(st.sampled_from([4, 8, 16, 32]))
    tile = draw(st.one_of(st.none(), st.just(False), st.tuples(*[st.sampled_from([1, 2, 3, 4])] * len(grid))))
    return layout, k, d, s, c, block, tile, draw(st.booleans())


def _slow(pat, layout, block):
    perm = pat.permutation(layout, block)
    return plan_from_rule(pat.rule(layout), seq_len=layout.seq_len, block_q=block, block_k=block,
                          perm=None if perm is None else perm[None])


@settings(max_examples=35, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=plan_case())
def test_analytic_plan_equals_token_level_plan(case):
    layout, k, d, s, c, block, tile, dense = case
    pat = Neighborhood(kernel_size=k, dilation=d, stride=s, is_causal=c, block_size=block, tile_shape=tile,
                       dense_nongrid=dense)
    fast = pat.plan(layout)
    slow = _slow(pat, layout, block)
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    assert math.isclose(fast.token_density, slow.token_density, rel_tol=0, abs_tol=1e-12)
    assert (fast.perm is None) == (slow.perm is None)
    assert torch.equal(fast.token_mask()[0, 0], pat.mask(layout)[0])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=plan_case(), regrouped=st.booleans())
def test_analytic_plan_is_exact_for_any_token_order(case, regrouped):
    """Box cutting is exact whatever the order (here a random permutation of the grid tokens)."""
    layout, k, d, s, c, block, _, dense = case
    rule = NeighborhoodRule(layout.grid, layout.prefix, layout.suffix, k, d, s, c, dense)
    g = torch.Generator().manual_seed(layout.seq_len)
    perm = layout.custom_permutation(torch.randperm(layout.num_grid_tokens, generator=g))
    fast = neighborhood_plan_analytic(rule, layout, block, block, perm, regrouped)
    slow = plan_from_rule(rule, seq_len=layout.seq_len, block_q=block, block_k=block, perm=perm[None])
    assert torch.equal(fast.block_classes(), slow.block_classes())


def test_65536_token_plan_never_evaluates_the_token_rule(monkeypatch):
    """Issue 20: a 1-D plan for 65,536 tokens is built from per-axis windows (no S x S rule)."""
    def boom(self, h, q, k):
        raise AssertionError("token rule evaluated during plan construction")

    monkeypatch.setattr(NeighborhoodRule, "__call__", boom)
    layout = TokenLayout((65536,))
    plan = Neighborhood(kernel_size=127).plan(layout)
    assert plan.num_q_blocks == 1024
    # 127-token windows in 64-token blocks: 2 (at the borders) to 4 key blocks per query block
    listed = plan.kv_num_blocks + plan.full_kv_num_blocks
    assert int(listed.min()) >= 2 and int(listed.max()) <= 4
    assert math.isclose(plan.token_density, 127 / 65536, rel_tol=1e-12)


# kernel_size = 3 * stride on grids the stride divides ((9, 15, 27) / (3, 5, 9) style, with
# power-of-two strides so a tile can hold exactly one stride group): every block must be full
GNA_CASES = [
    ((128,), (48,), (16,), 16),
    ((16, 32), (12, 24), (4, 8), 32),
    ((6, 8, 16), (6, 6, 12), (2, 2, 4), 16),
    ((8, 16, 16), (6, 12, 12), (2, 4, 4), 32),
]


@pytest.mark.parametrize("grid,kernel,stride,block", GNA_CASES)
def test_stride_aligned_plan_has_only_full_blocks_and_matches_natten(grid, kernel, stride, block):
    layout = TokenLayout(grid)
    pat = Neighborhood(kernel_size=kernel, stride=stride)
    plan = pat.plan(layout)
    assert plan.block_q == block and tuple(plan.meta["tile_shape"]) == stride
    assert int(plan.kv_num_blocks.sum()) == 0 and not plan.has_partial
    # fully block-sparse: computed pairs are exactly the allowed pairs
    assert math.isclose(plan.block_density, plan.token_density, rel_tol=1e-12)
    assert torch.equal(plan.token_mask()[0, 0], pat.mask(layout)[0])
    natten = pytest.importorskip("natten")
    import vidattn

    g = torch.Generator().manual_seed(len(grid))
    q, k, v = (torch.randn(1, *grid, 2, 8, generator=g) for _ in range(3))
    ours = {1: vidattn.na1d, 2: vidattn.na2d, 3: vidattn.na3d}[len(grid)]
    theirs = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(grid)]
    a = theirs(q, k, v, kernel_size=kernel, stride=stride)
    b = ours(q, k, v, kernel_size=kernel, stride=stride, backend="reference")
    assert (a - b).abs().max().item() <= 1e-5


def test_stride_aligned_tile_with_fixed_block_size():
    """With block_size fixed, a stride-aligned tile of that size is among the candidates."""
    layout = TokenLayout((8, 16, 16))
    plan = Neighborhood(kernel_size=(6, 12, 12), stride=(2, 4, 4), block_size=16).plan(layout)
    assert plan.block_q == 16 and not plan.has_partial
    t = tuple(plan.meta["tile_shape"])
    assert math.prod(t) == 16 and all(s % ti == 0 for s, ti in zip((2, 4, 4), t))
    # odd strides cannot align with power-of-two tiles: still exact, with partial blocks
    odd = Neighborhood(kernel_size=(3, 9, 9), stride=(1, 3, 3)).plan(TokenLayout((4, 18, 18)))
    assert odd.has_partial
    assert torch.equal(odd.token_mask()[0, 0], Neighborhood(kernel_size=(3, 9, 9), stride=(1, 3, 3)).mask(
        TokenLayout((4, 18, 18)))[0])


def test_stride_aligned_plan_prefers_the_larger_tile_on_equal_cost():
    """Stride (4, 4, 8): tiles (2, 4, 8) (64 tokens) and (4, 4, 8) (128) both give only full blocks
    and the same key tokens per query; the 128-token tile (the kernel's faster query tile) wins."""
    small = TokenLayout((12, 16, 32))
    pat = Neighborhood(kernel_size=(12, 12, 24), stride=(4, 4, 8))
    plan = pat.plan(small)
    assert plan.block_q == 128 and tuple(plan.meta["tile_shape"]) == (4, 4, 8) and not plan.has_partial
    assert torch.equal(plan.token_mask()[0, 0], pat.mask(small)[0])
    layout = TokenLayout((20, 32, 48))  # the Wan-like grid of benchmarks/neighborhood_gna.py
    plan = pat.plan(layout)
    assert plan.block_q == 128 and tuple(plan.meta["tile_shape"]) == (4, 4, 8) and not plan.has_partial
    p64 = Neighborhood(kernel_size=(12, 12, 24), stride=(4, 4, 8), block_size=64).plan(layout)
    assert p64.block_q == 64 and not p64.has_partial
    assert math.isclose(p64.block_density, plan.block_density, rel_tol=1e-12)
