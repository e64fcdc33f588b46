"""Hypothesis draws of neighborhood-attention parameters, shared by the NATTEN tests."""

from hypothesis import strategies as st


def draw_na_axes(draw, kernel, dilation, slack):
    """Inside an ``st.composite``: 1 to 3 axes of NATTEN parameters, as tuples
    ``(grid, kernel_size, dilation, stride, is_causal)``. ``kernel`` / ``dilation``: inclusive
    ``(low, high)`` per axis; stride in ``[1, kernel]``; each grid axis in
    ``[kernel * dilation, kernel * dilation + slack[0]]`` on 1-2 axes (``slack[1]`` on 3 axes)."""
    ndim = draw(st.integers(1, 3))
    k, d, s, c, grid = [], [], [], [], []
    for _ in range(ndim):
        ka = draw(st.integers(*kernel))
        da = draw(st.integers(*dilation))
        k.append(ka), d.append(da), s.append(draw(st.integers(1, ka))), c.append(draw(st.booleans()))
        grid.append(draw(st.integers(ka * da, ka * da + (slack[0] if ndim < 3 else slack[1]))))
    return tuple(grid), tuple(k), tuple(d), tuple(s), tuple(c)
