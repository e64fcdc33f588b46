"""The registered "vidattn" diffusers backend, the step hook, set_attention_backend interplay,
family vocabulary, and the issue-20 regressions (FLUX non-grid img_ids, SparseAttnProcessor()).

References: the unmodified model (bit-exact), diffusers' own backends."""

import warnings

import pytest
import torch

import vidattn
from vidattn.pipelines import SparseAttnProcessor
from vidattn.pipelines.processors import attention_modules

from tiny_models import run, tiny_flux, tiny_wan


def _self_procs(model):
    return [m.processor for n, m in attention_modules(model).items() if n.endswith("attn1") or n.endswith(".attn")]


@pytest.fixture
def native_math_spy(monkeypatch):
    """Counts calls that reach diffusers' registered ``_native_math`` backend."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    name = AttentionBackendName._NATIVE_MATH
    fn = _AttentionBackendRegistry._backends[name]
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["query"].shape)
        return fn(*args, **kwargs)

    monkeypatch.setitem(_AttentionBackendRegistry._backends, name, spy)
    yield calls
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def test_backend_registered_with_context_parallel():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from vidattn.pipelines.diffusers_backend import register

    member = register()
    assert AttentionBackendName("vidattn") is member and register() is member
    assert "vidattn" in {m.value for m in AttentionBackendName.__members__.values()}
    assert _AttentionBackendRegistry._is_context_parallel_available(member)


def test_version_guard_names_minimum(monkeypatch):
    from diffusers.models import attention_dispatch as ad

    from vidattn.pipelines import diffusers_backend as db

    monkeypatch.delattr(ad, "_templated_context_parallel_attention")
    with pytest.raises(RuntimeError, match=r"needs diffusers >= 0\.36"):
        db.check_diffusers()


def test_set_attention_backend_before_apply_is_honoured_and_survives_remove(native_math_spy):
    model, inputs, grid = tiny_wan()
    dense = run(model, inputs)
    model.set_attention_backend("_native_math")
    h = vidattn.apply(model, vidattn.Neighborhood(kernel_size=(1, 3, 3)), dense_layers=(1,))
    native_math_spy.clear()
    run(model, inputs)
    # layer 1 self-attention (dense by schedule) + both cross-attentions reach _native_math
    assert len(native_math_spy) == 3 and h.sparse_calls == 1 and h.dense_calls == 1
    vidattn.remove(model)
    assert all(p._attention_backend == "_native_math" for p in _self_procs(model))
    native_math_spy.clear()
    out = run(model, inputs)
    assert len(native_math_spy) == 4
    assert (out - dense).abs().max().item() <= 1e-5


def test_set_attention_backend_after_apply_is_honoured_and_survives_remove(native_math_spy):
    model, inputs, grid = tiny_wan()
    originals = dict(model.attn_processors)
    h = vidattn.apply(model, vidattn.Neighborhood(kernel_size=(1, 3, 3)), dense_steps=1)
    model.set_attention_backend("_native_math")
    native_math_spy.clear()
    run(model, inputs)  # step 0: dense -> every call goes to _native_math
    assert len(native_math_spy) == 4 and h.sparse_calls == 0
    native_math_spy.clear()
    run(model, dict(inputs, timestep=torch.tensor([400])))  # step 1: self-attention sparse
    assert len(native_math_spy) == 2 and h.sparse_calls == 2
    vidattn.remove(model)
    assert all(model.attn_processors[k] is v for k, v in originals.items())
    assert all(p._attention_backend == "_native_math" for p in _self_procs(model))


def test_remove_restores_untouched_processors_bit_exactly():
    model, inputs, grid = tiny_wan()
    dense = run(model, inputs)
    before = [dict(p.__dict__) for p in _self_procs(model)]
    vidattn.apply(model, vidattn.Neighborhood(kernel_size=(1, 3, 3)))
    vidattn.remove(model)
    assert [dict(p.__dict__) for p in _self_procs(model)] == before
    assert torch.equal(run(model, inputs), dense)
    from diffusers.hooks import HookRegistry

    assert HookRegistry.check_if_exists_or_initialize(model).get_hook("vidattn_step") is None


def test_step_from_cache_context():
    model, inputs, grid = tiny_wan()
    dense = run(model, inputs)
    h = vidattn.apply(model, vidattn.Neighborhood(kernel_size=(1, 3, 3)), dense_steps=2)
    state = model.__dict__["_vidattn_state"]
    with model.cache_context("cond", step_index=1):
        out = run(model, inputs)
    assert state.step == 1 and h.sparse_calls == 0 and torch.equal(out, dense)
    with model.cache_context("cond", step_index=2):
        run(model, inputs)  # same timestep value, but the pipeline says step 2
    assert state.step == 2 and h.sparse_calls == 2
    model._reset_stateful_cache()  # diffusers' stateful-hook reset also resets vidattn's step
    assert state.step == 0
    vidattn.remove(model)


def test_flux_non_grid_img_ids_fall_back_to_dense_with_one_warning():
    model, inputs, grid = tiny_flux()
    bad = dict(inputs, img_ids=torch.rand(inputs["img_ids"].shape))  # diffusers' own tests use random ids
    dense = run(model, bad)
    for pattern in (vidattn.Dense(), vidattn.Neighborhood(kernel_size=(3, 3))):
        h = vidattn.apply(model, pattern)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            out1 = run(model, bad)
            out2 = run(model, bad)
        msgs = [str(w.message) for w in rec if "no token layout" in str(w.message)]
        assert len(msgs) == (0 if isinstance(pattern, vidattn.Dense) else 1), msgs
        assert torch.equal(out1, dense) and torch.equal(out2, dense)
        assert h.sparse_calls == 0
        out3 = run(model, inputs)  # a real grid afterwards runs the pattern again (Dense: its full plan)
        assert h.sparse_calls == 2
        assert torch.isfinite(out3).all()
        vidattn.remove(model)


def test_processor_constructible_without_arguments_like_load_ip_adapter():
    model, inputs, grid = tiny_flux()
    dense = run(model, inputs)
    vidattn.apply(model, vidattn.Neighborhood(kernel_size=(3, 3)))
    rebuilt = {n: type(p)() for n, p in model.attn_processors.items()}  # what load_ip_adapter does
    model.set_attn_processor(rebuilt)
    assert (run(model, inputs) - dense).abs().max().item() <= 1e-5  # SparseAttnProcessor() = dense
    vidattn.remove(model)


def test_family_vocabulary_and_mochi_rejected_consistently():
    from vidattn.pipelines.families import FAMILY_NAMES, UnsupportedModelError, canonical_family, detect_family

    assert FAMILY_NAMES == ("cogvideox", "flux", "hunyuan_video", "ltx_video", "wan")
    assert canonical_family("hunyuan") == "hunyuan_video" and canonical_family("LTX") == "ltx_video"
    model, _, _ = tiny_wan()
    assert detect_family(model) == "wan"
    from diffusers import MochiTransformer3DModel

    mochi = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                                    activation_fn="swiglu", max_sequence_length=8)
    for fn in (detect_family, lambda m: vidattn.apply(m, vidattn.Neighborhood(kernel_size=3))):
        with pytest.raises(UnsupportedModelError, match="Mochi is not supported"):
            fn(mochi)
    with pytest.raises(UnsupportedModelError, match="Mochi"):
        canonical_family("mochi")
    with pytest.raises(UnsupportedModelError, match="supported families"):
        detect_family(torch.nn.Linear(2, 2))


def test_global_watch_hooks_go_once_no_processor_waits():
    # a hand-installed processor that never meets its transformer must not leave the process-wide
    # module hooks running on every later module call (of any model)
    import gc

    from vidattn.pipelines import hooks

    gc.collect()
    others = list(hooks._WAITING)  # processors of earlier tests still alive: set aside, restored below
    for p in others:
        hooks._WAITING.discard(p)
    try:
        proc = SparseAttnProcessor(vidattn.Neighborhood(kernel_size=3))
        assert hooks._handles  # watching while it waits
        del proc
        gc.collect()
        torch.nn.Linear(2, 2)(torch.zeros(1, 2))  # any module call, not a supported transformer
        assert not hooks._handles
    finally:
        for p in others:
            hooks.watch_for_owner(p)
