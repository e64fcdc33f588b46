"""Token layouts: where each token of an attention sequence sits.

A model feeds attention a flat sequence of ``S`` tokens. :class:`TokenLayout` says how that
sequence maps onto an N-D grid (``(L,)``, ``(H, W)`` or ``(T, H, W)``, row-major, last axis
fastest) plus ``prefix`` non-grid tokens before the grid and ``suffix`` non-grid tokens after it
(text tokens in MM-DiT joint attention, CLS/register tokens in ViTs)::

    index:  [0, prefix)                  prefix tokens
            [prefix, prefix + N)         grid tokens, N = prod(grid), row-major
            [prefix + N, S)              suffix tokens

Permutations are LongTensors ``perm`` of shape ``[S]`` with the convention
``permuted = x.index_select(dim, perm)``, i.e. position ``i`` of the permuted sequence holds the
original token ``perm[i]``. :func:`invert_permutation` gives the exact inverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["TokenLayout", "invert_permutation", "apply_permutation", "check_permutation",
           "tile_major_order", "grid_position"]


@dataclass(frozen=True)
class TokenLayout:
    """An N-D token grid plus non-grid prefix/suffix tokens.

    Args:
        grid: positive ints, 1 to 3 axes: ``(L,)``, ``(H, W)`` or ``(T, H, W)``.
        prefix: number of non-grid tokens before the grid (e.g. text first, CLS tokens).
        suffix: number of non-grid tokens after the grid (e.g. HunyuanVideo's text tokens).
    """

    grid: tuple
    prefix: int = 0
    suffix: int = 0

    def __post_init__(self):
        grid = self.grid
        if isinstance(grid, int) and not isinstance(grid, bool):
            grid = (grid,)
        if isinstance(grid, torch.Size):
            grid = tuple(grid)
        if not isinstance(grid, (tuple, list)):
            raise TypeError(f"grid must be a tuple of ints like (T, H, W), got {type(grid).__name__}")
        grid = tuple(grid)
        if not 1 <= len(grid) <= 3:
            raise ValueError(f"grid must have 1, 2 or 3 axes ((L,), (H, W) or (T, H, W)), got {grid}")
        _check_positive_ints("grid", grid)
        for name in ("prefix", "suffix"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"{name} must be an int, got {type(val).__name__}")
            if val < 0:
                raise ValueError(f"{name} must be >= 0, got {val}")
        object.__setattr__(self, "grid", grid)

    # ------------------------------------------------------------------ sizes
    @property
    def ndim(self) -> int:
        """Number of grid axes (1, 2 or 3)."""
        return len(self.grid)

    @property
    def num_grid_tokens(self) -> int:
        """``prod(grid)``."""
        return math.prod(self.grid)

    @property
    def seq_len(self) -> int:
        """Total tokens ``S = prefix + prod(grid) + suffix``."""
        return self.prefix + self.num_grid_tokens + self.suffix

    @property
    def grid_slice(self) -> slice:
        """Slice of the grid tokens in the flat sequence."""
        return slice(self.prefix, self.prefix + self.num_grid_tokens)

    def check_seq_len(self, seq_len: int, name: str = "sequence") -> None:
        """Raise ``ValueError`` unless ``seq_len == prefix + prod(grid) + suffix``."""
        if seq_len != self.seq_len:
            raise ValueError(
                f"{name} length {seq_len} does not match the layout: prefix {self.prefix} + "
                f"prod(grid={self.grid}) {self.num_grid_tokens} + suffix {self.suffix} = {self.seq_len}"
            )

    # ------------------------------------------------------------ coordinates
    def coords(self, device=None) -> torch.Tensor:
        """Grid coordinates of the grid tokens.

        Returns:
            LongTensor ``[prod(grid), ndim]``; row ``i`` is the coordinate of grid token ``i``
            (sequence index ``prefix + i``).
        """
        axes = [torch.arange(g, device=device) for g in self.grid]
        mesh = torch.meshgrid(*axes, indexing="ij")
        return torch.stack([m.reshape(-1) for m in mesh], dim=-1)

    def token_coords(self, idx: torch.Tensor):
        """Decode sequence indices into grid coordinates (works inside FlexAttention mask_mods).

        Args:
            idx: integer tensor of sequence indices, any shape.
        Returns:
            ``(in_grid, coords)``: ``in_grid`` a BoolTensor shaped like ``idx`` (True for grid
            tokens) and ``coords`` a tuple of ``ndim`` integer tensors shaped like ``idx`` (values
            for non-grid tokens are clamped into the grid and meaningless).
        """
        g = idx - self.prefix
        in_grid = (g >= 0) & (g < self.num_grid_tokens)
        g = g.clamp(0, self.num_grid_tokens - 1)
        out = []
        for size in reversed(self.grid):
            out.append(g % size)
            g = g // size
        return in_grid, tuple(reversed(out))

    # ----------------------------------------------------------- permutations
    def identity_permutation(self, device=None) -> torch.Tensor:
        """LongTensor ``[S]``: ``arange(S)``."""
        return torch.arange(self.seq_len, device=device)

    def _grid_perm_to_seq(self, grid_perm: torch.Tensor) -> torch.Tensor:
        dev = grid_perm.device
        return torch.cat(
            [
                torch.arange(self.prefix, device=dev),
                grid_perm + self.prefix,
                torch.arange(self.prefix + self.num_grid_tokens, self.seq_len, device=dev),
            ]
        )

    def tile_permutation(self, tile_shape: Sequence[int], device=None) -> torch.Tensor:
        """Tile-major order of the grid tokens (prefix/suffix tokens stay in place).

        Tiles of ``tile_shape`` are visited row-major, tokens within a tile row-major. Edge tiles
        of grids that ``tile_shape`` does not divide are smaller (no padding tokens).

        Returns:
            LongTensor ``[S]`` with ``permuted = x.index_select(dim, perm)``.
        """
        tile = _check_tuple("tile_shape", tile_shape, self.ndim)
        return self._grid_perm_to_seq(tile_major_order(self.coords(device), self.grid, tile))

    def transpose_permutation(self, axes: Sequence[int], device=None) -> torch.Tensor:
        """Grid tokens reordered as if the grid axes were transposed to ``axes``.

        E.g. ``axes=(1, 2, 0)`` on a ``(T, H, W)`` grid gives position-major order (all frames of
        one spatial position next to each other). Prefix/suffix tokens stay in place.

        Returns:
            LongTensor ``[S]``.
        """
        axes = tuple(axes)
        if sorted(axes) != list(range(self.ndim)):
            raise ValueError(f"axes must be a permutation of range({self.ndim}), got {axes}")
        ids = torch.arange(self.num_grid_tokens, device=device).reshape(self.grid)
        return self._grid_perm_to_seq(ids.permute(*axes).reshape(-1))

    def custom_permutation(self, grid_perm: torch.Tensor) -> torch.Tensor:
        """Lift an arbitrary permutation of the grid tokens (LongTensor ``[prod(grid)]``) to the
        full sequence (prefix/suffix tokens stay in place). Returns LongTensor ``[S]``."""
        check_permutation(grid_perm, self.num_grid_tokens, name="grid_perm")
        return self._grid_perm_to_seq(grid_perm.long())


def _check_tuple(name, value, ndim):
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * ndim
    if not isinstance(value, (tuple, list)) or len(value) != ndim:
        raise ValueError(f"{name} must be an int or a tuple of {ndim} ints, got {value!r}")
    _check_positive_ints(name, value)
    return tuple(value)


def _check_positive_ints(name, values):
    """Raise unless every entry of the tuple/list ``values`` is an int (not a bool) >= 1."""
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} entries must be ints, got {values!r}")
        if v < 1:
            raise ValueError(f"{name} entries must be >= 1, got {values!r}")


def tile_major_order(coords: torch.Tensor, grid: Sequence[int], tile: Sequence[int]) -> torch.Tensor:
    """The order visiting the points ``coords`` (LongTensor ``[N, ndim]``, within ``grid``) tile by
    tile: tiles of shape ``tile`` row-major, points within a tile row-major (edge tiles smaller).
    Returns LongTensor ``[N]``, the point indices in that order."""
    num_tiles = [math.ceil(g / t) for g, t in zip(grid, tile)]
    tile_key = torch.zeros(coords.shape[0], dtype=torch.long, device=coords.device)
    in_key = torch.zeros_like(tile_key)
    for a in range(len(grid)):
        tile_key = tile_key * num_tiles[a] + coords[:, a] // tile[a]
        in_key = in_key * tile[a] + coords[:, a] % tile[a]
    return torch.argsort(tile_key * math.prod(tile) + in_key)


def grid_position(idx: torch.Tensor, prefix: int, num_grid: int):
    """Grid positions of sequence indices ``idx`` (integer tensor, any shape) in a layout with
    ``prefix`` tokens before ``num_grid`` grid tokens. Returns ``(pos, in_grid)``: the position
    ``idx - prefix`` clamped to ``[0, num_grid)`` (meaningless for non-grid tokens) and the bool
    tensor of the indices that are grid tokens, both of ``idx``'s shape."""
    g = idx - prefix
    return g.clamp(0, num_grid - 1), (g >= 0) & (g < num_grid)


def check_permutation(perm: torch.Tensor, n: int, name: str = "perm") -> None:
    """Raise unless ``perm`` is an integer tensor ``[..., n]`` whose last axis is a permutation
    of ``range(n)``."""
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(perm).__name__}")
    if perm.dtype.is_floating_point or perm.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {perm.dtype}")
    if perm.dim() < 1 or perm.shape[-1] != n:
        raise ValueError(f"{name} must have shape [..., {n}], got {tuple(perm.shape)}")
    srt = perm.sort(dim=-1).values
    if not torch.equal(srt, torch.arange(n, device=perm.device).expand_as(srt).to(srt.dtype)):
        raise ValueError(f"{name} is not a permutation of range({n})")


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """Exact inverse of a permutation (along the last axis).

    Args:
        perm: LongTensor ``[..., S]``.
    Returns:
        LongTensor ``inv`` ``[..., S]`` with ``inv[..., perm[..., i]] = i``.
    """
    inv = torch.empty_like(perm)
    ar = torch.arange(perm.shape[-1], device=perm.device, dtype=perm.dtype).expand_as(perm)
    inv.scatter_(-1, perm, ar.contiguous())
    return inv


def apply_permutation(x: torch.Tensor, perm: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Reorder ``x`` along ``dim`` so that ``out.select(dim, i) == x.select(dim, perm[i])``.

    Args:
        x: any tensor, e.g. ``[B, S, heads, D]`` with ``dim=1``.
        perm: LongTensor ``[S]``.
    """
    return x.index_select(dim, perm.to(x.device))
