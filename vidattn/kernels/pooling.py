"""Old import path of the block pooling helpers, now in the neutral module :mod:`vidattn.pooling`."""

from vidattn.pooling import block_counts, block_masked_mean, block_mean_absdev, block_mean_pool, block_moments

__all__ = ["block_counts", "block_mean_pool", "block_moments", "block_mean_absdev", "block_masked_mean"]
