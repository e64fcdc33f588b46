"""Sync-free plan construction for dynamic patterns and per-plan cached properties."""

import torch

import vidattn
from vidattn.kernels.flex import flex_kernel_options
from vidattn.kernels.reference import block_sparse_attention_reference as reference
from vidattn.plan import FULL, indices_from_block_mask, plan_from_block_mask


def _classes(seed=0, B=2, H=3, nb=5):
    g = torch.Generator().manual_seed(seed)
    cls = torch.where(torch.rand(B, H, nb, nb, generator=g) < 0.4, FULL, 0).to(torch.int8)
    cls[..., 0] = FULL  # every row keeps one block
    return cls


def test_full_only_plan_matches_default_build():
    cls = _classes()
    S = 5 * 16 - 7  # ragged last block
    a = plan_from_block_mask(cls, seq_len=S, block_q=16, block_k=16, rule=None, token_density=0.5)
    b = plan_from_block_mask(cls, seq_len=S, block_q=16, block_k=16, rule=None,
                             token_density=torch.tensor(0.5), full_only=True)
    assert b.kv_indices.shape[-1] == 0 and not b.has_partial
    assert b.full_kv_indices.shape[-1] == 5  # NKB wide: no max() sync
    assert torch.equal(a.full_kv_num_blocks, b.full_kv_num_blocks)
    n = b.full_kv_num_blocks.long()
    for i in range(n.numel()):  # same listed blocks, same order
        r = torch.unravel_index(torch.tensor(i), n.shape)
        k = int(n[r])
        assert torch.equal(a.full_kv_indices[r][:k], b.full_kv_indices[r][:k])
    assert abs(a.block_density - b.block_density) < 1e-12
    assert float(b.token_density) == 0.5 and b.describe()["token_density"] == 0.5
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, S, 3, 8, generator=g) for _ in range(3))
    assert torch.equal(reference(q, k, v, a), reference(q, k, v, b))


def test_indices_width_argument():
    mask = torch.tensor([[[[True, False, True, False], [False, False, False, True]]]])
    num, idx = indices_from_block_mask(mask, width=4)
    assert num.tolist() == [[[2, 1]]]
    assert idx.shape[-1] == 4 and idx[0, 0, 0, :2].tolist() == [0, 2] and idx[0, 0, 1, 0].item() == 3


def test_rectified_plan_meta_is_lazy_but_readable():
    layout = vidattn.TokenLayout((2, 4, 8), suffix=3)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, layout.seq_len, 2, 16, generator=g) for _ in range(3))
    plan = vidattn.RectifiedSparse(keep=0.5, block_size=16).plan(layout, q, k, v=v)
    assert isinstance(plan.token_density, torch.Tensor)
    d = plan.describe()
    assert 0 < d["token_density"] <= 1 and isinstance(d["keep_fraction"], float)
    assert abs(plan.sparsity - (1 - d["token_density"])) < 1e-6


def test_flex_kernel_options_divide_plan_blocks():
    layout = vidattn.TokenLayout((4, 8, 8))
    assert flex_kernel_options(vidattn.Dense().plan(layout)) is None  # 128-token blocks: flex defaults
    opts = flex_kernel_options(vidattn.Dense(block_size=32).plan(layout))
    assert opts == {"BLOCK_M": 32, "BLOCK_N": 32}
