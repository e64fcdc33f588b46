"""vidattn.timm: sparse attention swapped into timm ViTs (random weights, CPU, fp32, tiny images).

Independent reference: the *unswapped* timm model run with ``attn_mask = pattern.mask(layout)``
(timm's own attention code with torch SDPA), so the swapped model must match it exactly up to
float rounding; a covering pattern must match the plain model.
"""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

timm = pytest.importorskip("timm")

import vidattn  # noqa: E402
from vidattn.layout import TokenLayout  # noqa: E402
from vidattn.patterns.base import Pattern  # noqa: E402
from vidattn.pipelines.timm import (  # noqa: E402
    SparseTimmAttention,
    restore_attention,
    swap_attention,
    swapped_blocks,
)

TOL = 1e-4


def _randomize(model, seed=0):
    """Redraw every parameter so that attention matters (timm zero-inits heads, 1e-5 layer scales)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "token" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
            elif p.dim() == 1 and (name.endswith("weight") or "gamma" in name):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _model(name, seed=0, **kw):
    torch.manual_seed(seed)
    m = timm.create_model(name, pretrained=False, **kw).eval()
    return _randomize(m, seed)


def _img(h, w=None, b=2, seed=1):
    return torch.randn(b, 3, h, w or h, generator=torch.Generator().manual_seed(seed))


def _layout(model, img):
    grid = model.patch_embed.dynamic_feat_size(tuple(img.shape[-2:]))
    return TokenLayout(grid=tuple(grid), prefix=model.num_prefix_tokens)


def _masked_reference(model, img, pattern, blocks=None):
    """Logits of the unswapped model with the pattern's token mask on the selected blocks."""
    mask = pattern.mask(_layout(model, img))[None]  # [1, 1, S, S], True = may attend
    if blocks is None:
        return model(img, attn_mask=mask)
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(img))))
    for i, blk in enumerate(model.blocks):
        x = blk(x, attn_mask=mask if i in blocks else None)
    return model.forward_head(model.norm(x))


def _maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------- exactness
def _gated_block0(model):
    """Block 0 gets a gated timm Attention (sigmoid gate before proj), not reachable via create_model."""
    from timm.layers import Attention

    model.blocks[0].attn = Attention(model.embed_dim, model.blocks[0].attn.num_heads, qkv_bias=True, gated=True)


def _eva_separate_bias(model):
    for blk in model.blocks:
        blk.attn.qkv_bias_separate = True  # q/v bias added after the linear instead of inside F.linear


# name, kwargs, image size, expected attention class, tweak applied before randomizing
MODELS = [
    ("vit_tiny_patch16_224", dict(img_size=64, depth=2), 64, "Attention", None),  # CLS only
    ("vit_small_patch14_reg4_dinov2", dict(img_size=56, depth=2), 56, "Attention", None),  # CLS + 4 registers
    ("deit_tiny_distilled_patch16_224", dict(img_size=64, depth=2), 64, "Attention", None),  # CLS + distillation
    ("vit_tiny_patch16_224", dict(img_size=64, depth=2, qk_norm=True, scale_attn_norm=True), 64, "Attention",
     _gated_block0),  # qk-norm, scale-norm, gate
    ("eva02_tiny_patch14_224", dict(img_size=56, depth=2), 56, "EvaAttention", None),  # rope, q/v bias, swiglu
    ("eva02_tiny_patch14_224", dict(img_size=56, depth=1), 56, "EvaAttention", _eva_separate_bias),
    ("eva02_tiny_patch14_224", dict(img_size=56, depth=1, qkv_fused=False), 56, "EvaAttention", None),
    ("vit_small_patch16_rope_224", dict(img_size=64, depth=2, attn_type="rope", qkv_fused=False, num_kv_heads=2),
     64, "AttentionRope", None),  # rope + GQA
    ("vit_small_patch16_rope_mixed_224", dict(img_size=64, depth=2), 64, "AttentionRope", None),  # per-head rope
    ("vit_betwixt_patch16_rope_reg4_gap_256", dict(img_size=64, depth=1), 64, "EvaAttention", None),  # rope + regs
]


def _ids(m):
    tweak = "-" + m[4].__name__.strip("_") if m[4] else ""
    return m[0] + tweak + ("-unfused" if m[1].get("qkv_fused") is False else "")


@pytest.mark.parametrize("name,kw,size,attn_cls,tweak", MODELS, ids=[_ids(m) for m in MODELS])
def test_covering_pattern_reproduces_logits_and_sparse_matches_masked_model(name, kw, size, attn_cls, tweak):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kw).eval()
    if tweak is not None:
        tweak(model)
    model = _randomize(model.eval())
    assert type(model.blocks[0].attn).__name__ == attn_cls
    img = _img(size)
    layout = _layout(model, img)
    with torch.no_grad():
        ref = model(img)
        # covering patterns: dense, and a neighborhood as large as the grid (multi-block plan)
        for cover in (vidattn.Dense(), vidattn.Neighborhood(kernel_size=layout.grid, block_size=8)):
            swap_attention(model, cover)
            assert _maxdiff(model(img), ref) <= TOL
        sparse = vidattn.Neighborhood(kernel_size=3, block_size=8)
        swap_attention(model, sparse)
        out = model(img)
        restore_attention(model)
        masked = _masked_reference(model, img, sparse)
        assert _maxdiff(out, masked) <= TOL
        assert _maxdiff(out, ref) > 1e-2  # a real sparse pattern changes the logits
        assert torch.equal(model(img), ref)  # restore: bit-identical


def test_partial_blocks_dilation_stride_and_no_stacking():
    model = _model("vit_tiny_patch16_224", img_size=96, depth=3)
    img = _img(96)
    first = vidattn.Neighborhood(kernel_size=5, block_size=8)
    pat = vidattn.Neighborhood(kernel_size=3, dilation=(2, 1), stride=(1, 2), block_size=16)
    with torch.no_grad():
        swap_attention(model, first, blocks=range(0, 3))
        swap_attention(model, pat, blocks=[0, -1])  # replaces blocks 0 and 2, block 1 keeps `first`
        assert swapped_blocks(model) == [0, 1, 2]
        assert all(type(model.blocks[i].attn.original).__name__ == "Attention" for i in range(3))
        assert model.blocks[0].attn.pattern == pat and model.blocks[1].attn.pattern == first
        restore_attention(model, blocks=[1])
        assert swapped_blocks(model) == [0, 2]
        out = model(img)
        restore_attention(model)
        assert swapped_blocks(model) == [] and len(model.patch_embed._forward_pre_hooks) == 0
        ref = _masked_reference(model, img, pat, blocks={0, 2})
    assert _maxdiff(out, ref) <= TOL


def test_dynamic_img_size_two_resolutions_non_square():
    model = _model("vit_tiny_patch16_224", img_size=64, depth=2, dynamic_img_size=True)
    pat = vidattn.Neighborhood(kernel_size=3, dilation=(1, 2), stride=(1, 2), block_size=8)
    swap_attention(model, pat)
    for h, w in ((64, 96), (96, 128)):
        img = _img(h, w, b=1)
        with torch.no_grad():
            out = model(img)
            assert model.__dict__["_vidattn_grid_tracker"].grid == (h // 16, w // 16)
            swapped = [b.attn for b in model.blocks]
            restore_attention(model)
            ref = _masked_reference(model, img, pat)
            for b, a in zip(model.blocks, swapped):
                b.attn = a  # put the same swapped modules back for the next resolution
            swap_attention(model, pat)
        assert _maxdiff(out, ref) <= TOL
    # a size the pattern cannot serve fails with the pattern's error at run time
    with pytest.raises(ValueError, match="kernel_size"):
        with torch.no_grad():
            model(_img(64, 32, b=1))


@settings(max_examples=12, deadline=None)
@given(hp=st.integers(2, 6), wp=st.integers(2, 6), class_token=st.booleans(), regs=st.integers(0, 3),
       data=st.data())
def test_random_grids_prefixes_and_windows_match_masked_model(hp, wp, class_token, regs, data):
    kh, kw = data.draw(st.integers(1, hp)), data.draw(st.integers(1, wp))
    dh, dw = data.draw(st.integers(1, hp // kh)), data.draw(st.integers(1, wp // kw))
    sh, sw = data.draw(st.integers(1, kh)), data.draw(st.integers(1, kw))
    block = data.draw(st.sampled_from([4, 8, 128]))
    pat = vidattn.Neighborhood(kernel_size=(kh, kw), dilation=(dh, dw), stride=(sh, sw), block_size=block)
    model = _model("vit_tiny_patch16_224", img_size=32, depth=1, dynamic_img_size=True, class_token=class_token,
                   reg_tokens=regs, global_pool="avg", no_embed_class=not class_token)
    img = _img(16 * hp, 16 * wp, b=1)
    with torch.no_grad():
        swap_attention(model, pat)
        out = model.forward_features(img)
        restore_attention(model)
        mask = pat.mask(_layout(model, img))[None]
        ref = model.forward_features(img, attn_mask=mask)
    assert _maxdiff(out, ref) <= TOL


# ----------------------------------------------------------------------------- training
def test_gradients_match_masked_model():
    pat = vidattn.Neighborhood(kernel_size=3, block_size=8)
    swapped = _model("vit_small_patch14_reg4_dinov2", img_size=56, depth=2)
    plain = copy.deepcopy(swapped)
    swap_attention(swapped, pat)
    img = _img(56)
    swapped(img).square().mean().backward()
    _masked_reference(plain, img, pat).square().mean().backward()
    grads = dict(plain.named_parameters())
    n_checked = 0
    for name, p in swapped.named_parameters():
        ref = grads[name].grad
        assert p.grad is not None, name
        assert _maxdiff(p.grad, ref) <= 1e-4 * max(1.0, ref.abs().max().item()), name
        n_checked += "qkv.weight" in name
    assert n_checked == 2
    assert swapped.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_optimizer_step_through_swap_updates_original_parameters():
    model = _model("vit_tiny_patch16_224", img_size=64, depth=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before the swap
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    swap_attention(model, vidattn.Neighborhood(kernel_size=3))
    model.train()
    model(_img(64)).sum().backward()
    opt.step()
    restore_attention(model)
    assert model.blocks[0].attn.training
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before)


# ----------------------------------------------------------------------------- state dict / modules
def test_state_dict_keys_and_checkpoints_load_before_and_after_swap():
    model = _model("eva02_tiny_patch14_224", img_size=56, depth=2)
    img = _img(56)
    keys = list(model.state_dict().keys())
    params = [id(p) for p in model.parameters()]
    other = _model("eva02_tiny_patch14_224", seed=5, img_size=56, depth=2)
    with torch.no_grad():
        other_ref = other(img)
        swap_attention(model, vidattn.Dense())
        assert list(model.state_dict().keys()) == keys
        assert [id(p) for p in model.parameters()] == params
        model.load_state_dict(other.state_dict())  # load after the swap
        assert _maxdiff(model(img), other_ref) <= TOL
        restore_attention(model)
        assert torch.equal(model(img), other_ref)
        sd = copy.deepcopy(model.state_dict())
        fresh = _model("eva02_tiny_patch14_224", seed=7, img_size=56, depth=2)
        swap_attention(fresh, vidattn.Dense())
        fresh.load_state_dict(sd)  # checkpoint saved unswapped, loaded swapped
        assert _maxdiff(fresh(img), other_ref) <= TOL


def test_dtype_conversion_while_swapped_is_kept_on_restore():
    model = _model("eva02_tiny_patch14_224", img_size=56, depth=1)
    ref_model = copy.deepcopy(model).double()
    img = _img(56).double()
    swap_attention(model, vidattn.Dense())
    model.double()  # replaces EVA's k_bias buffer tensor inside the swapped module
    with torch.no_grad():
        assert model(img).dtype == torch.float64
        restore_attention(model)
        assert model.blocks[0].attn.k_bias.dtype == torch.float64
        assert torch.equal(model(img), ref_model(img))


def test_deepcopy_of_swapped_model_tracks_its_own_grid():
    model = _model("vit_tiny_patch16_224", img_size=64, depth=1, dynamic_img_size=True)
    swap_attention(model, vidattn.Neighborhood(kernel_size=3))
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone(_img(96, 64, b=1))
        assert clone.__dict__["_vidattn_grid_tracker"].grid == (6, 4)
        assert model.__dict__["_vidattn_grid_tracker"].grid == (4, 4)
        assert clone.blocks[0].attn._tracker is clone.__dict__["_vidattn_grid_tracker"]


# ----------------------------------------------------------------------------- other 2-D patterns
def _optional_pattern(name):
    try:
        return getattr(vidattn, name)
    except (ImportError, AttributeError) as e:
        pytest.skip(f"vidattn.{name} not available yet: {e}")


def _hand_wired_logits(model, img, pattern, rows_as_frames=False):
    """Independent wiring: run each original attention by hand through vidattn.sparse_attention."""
    layout = _layout(model, img)
    if rows_as_frames:
        layout = TokenLayout(grid=(layout.grid[0], 1, layout.grid[1]), prefix=layout.prefix)
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(img))))
    for blk in model.blocks:
        a = blk.attn.original if isinstance(blk.attn, SparseTimmAttention) else blk.attn
        h = blk.norm1(x)
        B, N, C = h.shape
        q, k, v = a.qkv(h).reshape(B, N, 3, a.num_heads, a.head_dim).unbind(2)
        o = vidattn.sparse_attention(a.q_norm(q), a.k_norm(k), v, pattern, layout, backend="reference")
        x = x + blk.ls1(a.proj(a.norm(o.reshape(B, N, C))))
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.forward_head(model.norm(x))


class _TopKeyBlocks(Pattern):
    """Test-local dynamic pattern: per (batch, head, query block) the diagonal key block plus the
    ``top`` key blocks of highest mean-pooled q.k score (whole blocks, natural token order)."""

    is_dynamic = True

    def __init__(self, block=8, top=1):
        self.block, self.top = block, top

    def plan(self, layout, q=None, k=None, *, num_heads=1, device=None):
        from vidattn.plan import FULL, plan_from_block_mask

        B, S, H, D = q.shape
        nb = -(-S // self.block)
        pad = nb * self.block - S
        qp, kp = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)).reshape(B, nb, self.block, -1, D).mean(2)
                  for t in (q, k))
        score = torch.einsum("bqhd,bkhd->bhqk", qp, kp)
        keep = torch.zeros_like(score, dtype=torch.bool)
        keep.scatter_(-1, score.topk(self.top, dim=-1).indices, True)
        keep |= torch.eye(nb, dtype=torch.bool, device=q.device)
        cls = keep.to(torch.int8) * FULL
        return plan_from_block_mask(cls, seq_len=S, block_q=self.block, block_k=self.block, rule=None,
                                    token_density=keep.float().mean().item())


def test_dynamic_pattern_batch_and_head_dependent_plans():
    model = _model("vit_tiny_patch16_224", img_size=96, depth=2)  # 37 tokens, 5 blocks of 8
    img = _img(96, b=2)
    pattern = _TopKeyBlocks()
    out = _check_dynamic_pattern(pattern, model, img)
    with torch.no_grad():
        restore_attention(model)
        assert _maxdiff(out, model(img)) > 1e-2


def _build(cls, **kw):
    """``cls(**kw)``, retried without ``block_size`` if the family does not take it."""
    try:
        return cls(**kw)
    except TypeError:
        kw.pop("block_size", None)
        return cls(**kw)


def _check_dynamic_pattern(pattern, model, img, rows_as_frames=False):
    """Swapped logits equal the hand-wired ones; gradients reach the qkv weights."""
    swap_attention(model, pattern)
    out = model(img)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        ref = _hand_wired_logits(model, img, pattern, rows_as_frames)
    assert _maxdiff(out, ref) <= TOL
    out.square().sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    return out.detach()


def test_rectified_sparse_swap():
    cls = _optional_pattern("RectifiedSparse")
    model = _model("vit_tiny_patch16_224", img_size=128, depth=2)  # 8x8 grid + CLS = 65 tokens
    img = _img(128, b=1)
    with torch.no_grad():
        ref = model(img)
    dense_like = _build(cls, keep=1.0, rectify=False, block_size=16)
    swap_attention(model, dense_like)
    with torch.no_grad():
        assert _maxdiff(model(img), ref) <= TOL  # keep everything, no rectification == dense
    out = _check_dynamic_pattern(_build(cls, keep=0.5, block_size=16), model, img)
    assert _maxdiff(out, ref) > 1e-3


def test_permuted_grid_swap_runs_on_patch_rows_as_frames():
    cls = _optional_pattern("PermutedGrid")
    # low recall: random weights have no structure, so force the profiler to pick sparse heads
    pattern = _build(cls, recall=0.05, block_size=16)
    model = _model("vit_tiny_patch16_224", img_size=128, depth=2)  # 8x8 grid: 8 "frames" of 8 patches
    img = _img(128, b=1)
    with torch.no_grad():
        ref = model(img)
    if pattern.needs_frames:
        with pytest.raises(ValueError, match="rows_as_frames=True"):
            swap_attention(model, pattern, rows_as_frames=False)
    chosen = []

    def observe(q, k, v, plan, out, scale):
        chosen.append(plan.meta.get("head_patterns"))

    with vidattn.attention.add_observer(observe):
        out = _check_dynamic_pattern(pattern, model, img, rows_as_frames=pattern.needs_frames)
    assert model.blocks[0].attn.rows_as_frames == pattern.needs_frames
    assert any(c is not None and set(c) != {"dense"} for c in chosen), chosen
    assert _maxdiff(out, ref) > 1e-3


# ----------------------------------------------------------------------------- errors
class _FramesOnly(Pattern):
    needs_frames = True


def test_clear_errors():
    model = _model("vit_tiny_patch16_224", img_size=64, depth=2)
    with pytest.raises(TypeError, match="vidattn pattern"):
        swap_attention(model, "neighborhood")
    with pytest.raises(ValueError, match="needs a \\(T, H, W\\)"):
        swap_attention(model, _FramesOnly())
    with pytest.raises(ValueError, match="3 axes"):
        swap_attention(model, vidattn.Neighborhood(kernel_size=(3, 3, 3)))
    with pytest.raises(ValueError, match="4x4 patch grid"):
        swap_attention(model, vidattn.Neighborhood(kernel_size=7))
    with pytest.raises(ValueError, match="out of range"):
        swap_attention(model, vidattn.Dense(), blocks=[5])
    with pytest.raises(TypeError, match="blocks entries"):
        swap_attention(model, vidattn.Dense(), blocks=["0"])
    with pytest.raises(ValueError, match="backend"):
        swap_attention(model, vidattn.Dense(), backend="cuda")
    with pytest.raises(TypeError, match="rows_as_frames"):
        swap_attention(model, vidattn.Dense(), rows_as_frames="yes")
    with pytest.raises(ValueError, match="has 2 axes"):  # a 2-D pattern asked to run on rows as frames
        swap_attention(model, vidattn.Neighborhood(kernel_size=(3, 3)), rows_as_frames=True)
    with pytest.raises(TypeError, match=".blocks"):
        swap_attention(nn.Linear(2, 2), vidattn.Dense())
    # unsupported attention class in a selected block; nothing is swapped (atomic)
    odd = copy.deepcopy(model)
    odd.blocks[1].attn = nn.Identity()
    with pytest.raises(TypeError, match="block 1.*Identity"):
        swap_attention(odd, vidattn.Dense())
    assert swapped_blocks(odd) == []
    diff = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=1, attn_layer="diff")
    with pytest.raises(TypeError, match="DiffAttention"):
        swap_attention(diff, vidattn.Dense())
    swap_attention(model, vidattn.Neighborhood(kernel_size=3))
    img = _img(64)
    S = 1 + 16
    with pytest.raises(ValueError, match="attn_mask"):
        model(img, attn_mask=torch.ones(S, S, dtype=torch.bool))
    with pytest.raises(ValueError, match="17 tokens|patch grid"):
        model.blocks(torch.randn(1, 10, 192))  # tokens that do not fit the recorded grid
    model.blocks[0].attn.attn_drop.p = 0.1
    model.train()
    with pytest.raises(ValueError, match="attention dropout"):
        model(img)


def test_radial_needs_frames_is_refused():
    radial = _optional_pattern("Radial")()
    assert radial.needs_frames
    model = _model("vit_tiny_patch16_224", img_size=64, depth=1)
    with pytest.raises(ValueError, match="Radial needs a \\(T, H, W\\) video grid"):
        swap_attention(model, radial)
    assert swapped_blocks(model) == []


def test_import_surface():
    assert vidattn.timm.swap_attention is swap_attention
    assert vidattn.timm.restore_attention is restore_attention


# ----------------------------------------------------------------------------- tracing / scripting
def test_vidattn_timm_module_imports():
    import importlib

    mod = importlib.import_module("vidattn.timm")
    from vidattn.timm import swap_attention as sa

    assert sa is swap_attention and mod.restore_attention is restore_attention


def test_swapped_forward_is_timms_own_code():
    from timm.layers import Attention

    from vidattn.pipelines.timm import _timm_forward

    model = _model("vit_tiny_patch16_224", img_size=64, depth=1)
    swap_attention(model, vidattn.Neighborhood(kernel_size=3))
    assert _timm_forward(Attention).__code__ is Attention.forward.__code__  # only F is re-bound
    attn = model.blocks[0].attn
    assert attn.fused_attn is True and attn.original.fused_attn is not None


@pytest.mark.parametrize("name,kw,size", [("vit_tiny_patch16_224", dict(img_size=64, depth=2), 64),
                                          ("eva02_tiny_patch14_224", dict(img_size=56, depth=1), 56)])
def test_fx_trace_and_feature_extractor_match_eager(name, kw, size):
    from timm.models import create_feature_extractor

    from vidattn.pipelines.timm import _sparse_sdpa

    model = _model(name, **kw)
    img = _img(size)
    pat = vidattn.Neighborhood(kernel_size=3)
    masked = _masked_reference(model, img, pat)
    swap_attention(model, pat, backend="reference")
    with torch.no_grad():
        eager = model(img)
        assert _maxdiff(eager, masked) < TOL
        gm = torch.fx.symbolic_trace(model)  # traces through timm's forward; the attention call is a leaf
        assert sum(n.target is _sparse_sdpa for n in gm.graph.nodes) == len(model.blocks)
        assert _maxdiff(gm(img), eager) < 1e-6
        fe = create_feature_extractor(model, return_nodes=["norm"])  # timm keeps the swapped module as a leaf
        assert _maxdiff(fe(img)["norm"], model.forward_features(img)) < 1e-6


def test_torchscript_is_refused_with_a_clear_error():
    model = _model("vit_tiny_patch16_224", img_size=64, depth=1)
    swap_attention(model, vidattn.Neighborhood(kernel_size=3))
    with pytest.raises(TypeError, match="torch.jit.script.*restore_attention"):
        torch.jit.script(model)
