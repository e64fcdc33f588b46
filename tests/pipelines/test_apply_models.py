"""vidattn.apply / remove / SparseAttnProcessor on tiny random-weight diffusers transformers of the
five supported families (Wan, HunyuanVideo, CogVideoX, LTX-Video, FLUX), CPU fp32.

Independent reference: the unmodified model with diffusers' attention call replaced by torch SDPA
using the pattern's token mask (``tiny_models.make_oracle``)."""

import importlib

import pytest
import torch

import vidattn
from vidattn.pipelines import SparseAttnProcessor
from vidattn.pipelines.processors import attention_modules

from tiny_models import BUILDERS, ORACLE_TARGET, TEXT_POSITION, make_oracle, run, tiny_hunyuan, tiny_wan

FAMILIES = list(BUILDERS)
EXPECTED_TEXT = {"wan": (0, 0), "hunyuan_video": (0, 5), "cogvideox": (4, 0), "ltx_video": (0, 0), "flux": (4, 0)}


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    name = request.param
    model, inputs, grid = BUILDERS[name]()
    dense = run(model, inputs)
    originals = dict(model.attn_processors)
    yield name, model, inputs, grid, dense, originals
    vidattn.remove(model)


def _small_kernel(grid):
    return tuple(min(3, g) for g in grid)


def _oracle_output(monkeypatch, family, model, inputs, pattern, grid, heads=None):
    dispatch, functional = make_oracle(pattern, grid, TEXT_POSITION[family], heads=heads)
    mod_name, attr = ORACLE_TARGET[family]
    monkeypatch.setattr(importlib.import_module(mod_name), attr, functional if attr == "F" else dispatch)
    try:
        return run(model, inputs)
    finally:
        monkeypatch.undo()


def test_covering_pattern_matches_dense_layout_and_remove(fam):
    family, model, inputs, grid, dense, originals = fam
    handle = vidattn.apply(model, vidattn.Neighborhood(kernel_size=grid))
    out = run(model, inputs)
    assert (out - dense).abs().max().item() <= 1e-4
    assert handle.grid == grid
    assert handle.layout.grid == grid
    assert (handle.layout.prefix, handle.layout.suffix) == EXPECTED_TEXT[family]
    assert handle.sparse_calls == len(handle.layer_names[0]) == 2
    assert handle.dense_calls == 0
    assert vidattn.remove(model) is True
    assert torch.equal(run(model, inputs), dense)
    now = model.attn_processors
    assert all(now[k] is v for k, v in originals.items())
    assert "_vidattn_state" not in model.__dict__


def test_sparse_pattern_matches_masked_sdpa_oracle(fam, monkeypatch):
    family, model, inputs, grid, dense, originals = fam
    pattern = vidattn.Neighborhood(kernel_size=_small_kernel(grid), block_size=16)
    handle = vidattn.apply(model, pattern)
    out = run(model, inputs)
    vidattn.remove(model)
    expected = _oracle_output(monkeypatch, family, model, inputs, pattern, grid)
    assert torch.isfinite(out).all()
    assert (out - expected).abs().max().item() <= 1e-4
    assert (out - dense).abs().max().item() > 1e-3
    plan = pattern.plan(handle.layout, num_heads=2)
    assert handle.densities == {0: pytest.approx(plan.block_density), 1: pytest.approx(plan.block_density)}
    td = plan.token_density
    assert handle.token_densities == {0: pytest.approx(td), 1: pytest.approx(td)}
    mask = pattern.mask(handle.layout)
    assert td == pytest.approx(mask.float().mean().item()) and td < 1.0
    assert torch.equal(run(model, inputs), dense)


def test_manual_set_attn_processor_learns_layout(fam):
    family, model, inputs, grid, dense, originals = fam
    pattern = vidattn.Neighborhood(kernel_size=_small_kernel(grid))
    vidattn.apply(model, pattern)
    via_apply = run(model, inputs)
    vidattn.remove(model)
    model.set_attn_processor(SparseAttnProcessor(pattern))
    try:
        first = run(model, inputs)  # layout learnt mid-call (hook installed lazily)
        second = run(model, inputs)  # layout from the hook
        state = model.__dict__["_vidattn_state"]
        assert state.record.grid == grid
        assert state.stats.sparse_calls == 4
    finally:
        model.set_attn_processor(originals)
        vidattn.remove(model)
    assert (first - via_apply).abs().max().item() <= 1e-6
    assert (second - via_apply).abs().max().item() <= 1e-6
    assert torch.equal(run(model, inputs), dense)


def test_apply_twice_replaces_never_stacks():
    model, inputs, grid = tiny_wan()
    originals = dict(model.attn_processors)
    dense = run(model, inputs)
    vidattn.apply(model, vidattn.Neighborhood(kernel_size=(1, 1, 1)))
    h = vidattn.apply(model, vidattn.Neighborhood(kernel_size=grid))
    procs = [m.processor for n, m in attention_modules(model).items() if n.endswith("attn1")]
    assert all(isinstance(p, SparseAttnProcessor) and not isinstance(p.inner, SparseAttnProcessor) for p in procs)
    assert (run(model, inputs) - dense).abs().max().item() <= 1e-4
    assert h.sparse_calls == 2
    vidattn.remove(model)
    assert all(model.attn_processors[k] is v for k, v in originals.items())
    assert vidattn.remove(model) is False


def test_dense_steps_and_layers_schedule():
    model, inputs, grid = tiny_wan()
    dense = run(model, dict(inputs, timestep=torch.tensor([900])))
    h = vidattn.apply(model, vidattn.Neighborhood(kernel_size=(1, 3, 3)), dense_steps=1, dense_layers=(1,))
    outs = []
    for t in (900, 900, 800, 700, 900):  # step 0 (cond), step 0 (uncond, CFG), step 1, step 2, new call -> step 0
        outs.append(run(model, dict(inputs, timestep=torch.tensor([t]))))
    # layer 0 goes sparse at steps 1 and 2 only; everything else dense
    assert h.sparse_calls == 2
    assert h.dense_calls == 8
    assert set(h.densities) == {0}
    assert torch.equal(outs[0], dense) and torch.equal(outs[4], dense)
    vidattn.remove(model)


def test_batch_and_cfg_batches_match_per_sample():
    model, inputs, grid = tiny_wan(batch=2)
    pattern = vidattn.Neighborhood(kernel_size=(1, 3, 3))
    vidattn.apply(model, pattern)
    both = run(model, inputs)
    singles = []
    for b in range(2):
        one = dict(inputs, hidden_states=inputs["hidden_states"][b:b + 1],
                   encoder_hidden_states=inputs["encoder_hidden_states"][b:b + 1], timestep=inputs["timestep"][b:b + 1])
        singles.append(run(model, one))
    vidattn.remove(model)
    assert (both - torch.cat(singles)).abs().max().item() <= 1e-5


def test_heads_subset_matches_oracle(monkeypatch):
    model, inputs, grid = tiny_wan()
    pattern = vidattn.Neighborhood(kernel_size=(1, 3, 3))
    vidattn.apply(model, pattern, heads=(1,))
    out = run(model, inputs)
    vidattn.remove(model)
    expected = _oracle_output(monkeypatch, "wan", model, inputs, pattern, grid, heads=(1,))
    full = _oracle_output(monkeypatch, "wan", model, inputs, pattern, grid)
    assert (out - expected).abs().max().item() <= 1e-4
    assert (out - full).abs().max().item() > 1e-3


def test_hunyuan_padded_text_mask_matches_oracle(monkeypatch):
    model, inputs, grid = tiny_hunyuan(batch=2, pad=2)
    inputs["encoder_attention_mask"][0] = 1  # sample 0 unpadded, sample 1 has 2 padded text tokens
    dense = run(model, inputs)
    vidattn.apply(model, vidattn.Neighborhood(kernel_size=grid))
    assert (run(model, inputs) - dense).abs().max().item() <= 1e-4
    pattern = vidattn.Neighborhood(kernel_size=(1, 3, 3))
    vidattn.apply(model, pattern)
    out = run(model, inputs)
    vidattn.remove(model)
    expected = _oracle_output(monkeypatch, "hunyuan_video", model, inputs, pattern, grid)
    # padded text rows are discarded by the model; compare the video tokens
    assert (out - expected).abs().max().item() <= 1e-4


def test_bf16_covering_pattern_close_to_dense():
    model, inputs, grid = tiny_wan()
    model = model.to(torch.bfloat16)
    inputs = dict(inputs, hidden_states=inputs["hidden_states"].bfloat16(),
                  encoder_hidden_states=inputs["encoder_hidden_states"].bfloat16())
    dense = run(model, inputs)
    vidattn.apply(model, vidattn.Neighborhood(kernel_size=grid))
    out = run(model, inputs)
    vidattn.remove(model)
    assert out.dtype == torch.bfloat16
    assert (out.float() - dense.float()).abs().max().item() <= 5e-2


# ---------------------------------------------------------------------------- bad use
def test_errors_for_bad_use():
    flux, flux_inputs, _ = BUILDERS["flux"]()
    with pytest.raises(ValueError, match="kernel_size"):
        vidattn.apply(flux, vidattn.Neighborhood(kernel_size=(3, 3, 3)))
    with pytest.raises(ValueError, match="video grid|frames"):
        vidattn.apply(flux, vidattn.Radial())
    assert "_vidattn_state" not in flux.__dict__  # nothing left behind
    with pytest.raises(TypeError, match="diffusers pipeline or transformer"):
        vidattn.apply(torch.nn.Linear(2, 2), vidattn.Neighborhood(kernel_size=3))
    with pytest.raises(TypeError, match="pattern"):
        vidattn.apply(flux, "radial")
    with pytest.raises(ValueError, match="dense_steps"):
        vidattn.SparseAttentionConfig(vidattn.Neighborhood(kernel_size=3), dense_steps=-1)

    with pytest.raises(ValueError, match="dense_layers"):
        vidattn.apply(flux, vidattn.Neighborhood(kernel_size=3), dense_layers=(7,))

    model, inputs, grid = tiny_wan()  # grid (3, 4, 4)
    h = vidattn.apply(model, vidattn.Neighborhood(kernel_size=(3, 5, 5)))
    with pytest.raises(ValueError, match="larger than the grid"):
        run(model, inputs)
    assert h.sparse_calls == 0 and h.dense_calls == 0  # raised before any attention ran
    vidattn.remove(model)


def test_torch_compile_no_graph_break_and_same_output():
    model, inputs, grid = tiny_wan()
    vidattn.apply(model, vidattn.Neighborhood(kernel_size=(1, 3, 3)))
    eager = run(model, inputs)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        out = compiled(**inputs)[0]
    vidattn.remove(model)
    torch._dynamo.reset()
    assert torch.equal(out, eager)


def test_layer_patterns_and_heads_override():
    """Per-layer overrides: a dense layer (None), a pattern on one head of another layer."""
    from vidattn.pipelines.apply import SparseAttentionConfig

    model, inputs, grid = BUILDERS["wan"]()
    dense = run(model, inputs)
    base = vidattn.Neighborhood(kernel_size=(1, 1, 1))
    cfg = SparseAttentionConfig(base, layer_patterns={0: None}, layer_heads={1: (0,)})
    assert cfg.pattern_for(0) is None and cfg.pattern_for(1) is base and cfg.heads_for(1) == (0,)
    assert cfg.heads_for(0) is None
    handle = vidattn.apply(model, cfg)
    out = run(model, inputs)
    assert handle.dense_calls == 1 and handle.sparse_calls == 1  # layer 0 dense, layer 1 sparse on head 0
    vidattn.remove(model)
    assert not torch.allclose(out, dense, atol=1e-4)
    cover = vidattn.Neighborhood(kernel_size=grid)
    vidattn.apply(model, SparseAttentionConfig(base, layer_patterns={0: cover, 1: cover}))
    out_cover = run(model, inputs)
    vidattn.remove(model)
    assert (out_cover - dense).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="out of range"):
        vidattn.apply(model, SparseAttentionConfig(base, layer_patterns={99: None}))
    with pytest.raises(TypeError, match="layer_patterns"):
        SparseAttentionConfig(base, layer_patterns={0: "dense"})
