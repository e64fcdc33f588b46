"""The compile-friendly custom op: same values as sparse_attention, autograd, fullgraph compile."""

import torch

import vidattn
from vidattn_testutils import dense_masked_attention
from vidattn.ops import sparse_attention_op


def _inputs(layout, heads=2, d=8, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, layout.seq_len, heads, d, generator=g, requires_grad=requires_grad) for _ in range(3)]


def test_op_matches_reference_and_has_gradients():
    layout = vidattn.TokenLayout((4, 6), prefix=2)
    pat = vidattn.Neighborhood(kernel_size=3, block_size=8)
    q, k, v = _inputs(layout, requires_grad=True)
    out = sparse_attention_op(q, k, v, pat, layout, backend="reference")
    ref = dense_masked_attention(q.detach(), k.detach(), v.detach(), pat.mask(layout))
    assert (out.double() - ref).abs().max() < 1e-5
    out.square().sum().backward()
    # gradients against autograd through the dense masked reference
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref2 = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q2, k2, v2)), attn_mask=pat.mask(layout)[None]).transpose(1, 2)
    ref2.square().sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert (a.grad.double() - b.grad).abs().max() < 1e-5


def test_op_compiles_without_graph_break():
    layout = vidattn.TokenLayout((3, 4, 4))
    pat = vidattn.Neighborhood(kernel_size=(3, 3, 3), block_size=16)
    q, k, v = _inputs(layout)

    def f(q, k, v):
        return sparse_attention_op(q * 1.0, k, v, pat, layout, backend="reference") + 1.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v)
    assert (out - f(q, k, v)).abs().max() < 1e-6


def test_op_passes_torch_library_opcheck():
    layout = vidattn.TokenLayout((3, 4))
    pat = vidattn.Neighborhood(kernel_size=3, block_size=4)
    q, k, v = _inputs(layout)
    torch.library.opcheck(torch.ops.vidattn.sparse_attn.default,
                          (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, pat._vidattn_key, [3, 4], 0, 0,
                           "reference", 0.3),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
