"""diffusers' own compile tests, reproduced on tiny Wan / FLUX transformers with vidattn applied.

diffusers' ``TorchCompileTesterMixin`` (tests/models/testing_utils/compile.py):

* ``test_torch_compile_recompilation_and_graph_break``: ``torch.compile(model, fullgraph=True)``,
  two calls under ``torch._dynamo.config.patch(error_on_recompile=True)``;
* ``test_torch_compile_repeated_blocks``: ``model.compile_repeated_blocks(fullgraph=True)``, two
  calls under ``recompile_limit=1``.

Same here, with ``backend="eager"`` (Dynamo's graph capture, guards and recompiles are what these
tests check; inductor code generation would only add minutes on CPU). The full-model test compiles
before any eager call (the case that used to fail on the first call). Outputs must equal the eager
sparse output and differ from dense (so the sparse path really ran inside the graph).
"""

import pytest
import torch

import vidattn

from tiny_models import run, tiny_flux, tiny_wan

CASES = {"wan": (tiny_wan, (1, 3, 3)), "flux": (tiny_flux, (3, 3))}


def _eager_reference(name):
    build, ks = CASES[name]
    model, inputs, _ = build()
    dense = run(model, inputs)
    vidattn.apply(model, vidattn.Neighborhood(kernel_size=ks))
    sparse = run(model, inputs)
    vidattn.remove(model)
    return dense, sparse


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", list(CASES))
def test_torch_compile_recompilation_and_graph_break(name):
    build, ks = CASES[name]
    model, inputs, _ = build()
    handle = vidattn.apply(model, vidattn.Neighborhood(kernel_size=ks))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        first = compiled(**inputs)[0]  # compiled before any eager call
        second = compiled(**inputs)[0]
    assert handle.grid is not None
    vidattn.remove(model)
    dense, sparse = _eager_reference(name)
    assert torch.equal(first, second)
    assert (first - sparse).abs().max().item() <= 1e-6
    assert (first - dense).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", list(CASES))
def test_torch_compile_repeated_blocks(name):
    build, ks = CASES[name]
    model, inputs, _ = build()
    vidattn.apply(model, vidattn.Neighborhood(kernel_size=ks))
    model.compile_repeated_blocks(fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True), torch.no_grad():
        first = model(**inputs)[0]
        second = model(**inputs)[0]
    vidattn.remove(model)
    dense, sparse = _eager_reference(name)
    assert torch.equal(first, second)
    assert (first - sparse).abs().max().item() <= 1e-6
    assert (first - dense).abs().max().item() > 1e-3
