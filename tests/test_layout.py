import pytest
import torch
from hypothesis import given, settings, strategies as st

import vidattn
from vidattn.layout import TokenLayout, apply_permutation, check_permutation, invert_permutation

grids = st.one_of(
    st.tuples(st.integers(1, 40)),
    st.tuples(st.integers(1, 9), st.integers(1, 9)),
    st.tuples(st.integers(1, 5), st.integers(1, 6), st.integers(1, 7)),
)


@settings(max_examples=25, deadline=None)
@given(grid=grids, prefix=st.integers(0, 4), suffix=st.integers(0, 4), data=st.data())
def test_permutations_round_trip(grid, prefix, suffix, data):
    layout = TokenLayout(grid, prefix, suffix)
    S = layout.seq_len
    tile = tuple(data.draw(st.integers(1, 4)) for _ in grid)
    axes = tuple(data.draw(st.permutations(list(range(len(grid))))))
    x = torch.randn(2, S, 3)
    for perm in (layout.tile_permutation(tile), layout.transpose_permutation(axes),
                 layout.custom_permutation(torch.randperm(layout.num_grid_tokens))):
        check_permutation(perm, S)
        inv = invert_permutation(perm)
        assert torch.equal(apply_permutation(apply_permutation(x, perm), inv), x)
        assert torch.equal(perm[inv], torch.arange(S))
        # non-grid tokens stay in place
        assert torch.equal(perm[:prefix], torch.arange(prefix))
        assert torch.equal(perm[S - suffix:], torch.arange(S - suffix, S))


def test_tile_permutation_groups_tiles():
    layout = TokenLayout((4, 4))
    perm = layout.tile_permutation((2, 2))
    # first tile = rows 0-1, cols 0-1 in row-major order
    assert perm[:4].tolist() == [0, 1, 4, 5]
    assert perm[4:8].tolist() == [2, 3, 6, 7]


def test_transpose_permutation_is_position_major():
    layout = TokenLayout((3, 2, 2), prefix=1)
    perm = layout.transpose_permutation((1, 2, 0))
    # position (0,0) in frames 0,1,2 -> grid ids 0, 4, 8 (+ prefix 1)
    assert perm[1:4].tolist() == [1, 5, 9]


def test_coords_and_token_coords_agree():
    layout = TokenLayout((3, 4, 5), prefix=2, suffix=1)
    c = layout.coords()
    in_grid, tc = layout.token_coords(torch.arange(layout.seq_len))
    assert in_grid.tolist() == [False] * 2 + [True] * 60 + [False]
    assert torch.equal(torch.stack(tc, -1)[2:62], c)
    assert c[7].tolist() == [0, 1, 2]


def test_seq_len_check_and_bad_input():
    layout = TokenLayout((2, 3), prefix=1, suffix=2)
    assert layout.seq_len == 9
    with pytest.raises(ValueError, match="does not match the layout"):
        layout.check_seq_len(10)
    with pytest.raises(ValueError, match="grid"):
        TokenLayout((1, 2, 3, 4))
    with pytest.raises(ValueError, match="grid"):
        TokenLayout((0, 3))
    with pytest.raises(TypeError, match="grid"):
        TokenLayout((2.0, 3))
    with pytest.raises(ValueError, match="prefix"):
        TokenLayout((2, 3), prefix=-1)
    with pytest.raises(TypeError, match="suffix"):
        TokenLayout((2, 3), suffix=1.5)
    with pytest.raises(ValueError, match="perm"):
        check_permutation(torch.tensor([0, 0, 1]), 3)
    with pytest.raises(ValueError, match="tile_shape"):
        layout.tile_permutation((2, 2, 2))
    assert vidattn.TokenLayout(grid=(5,)).grid == (5,)
