"""Backend registry: capability checks before dispatch, one warning for a declared refusal, bugs
propagate, the grad_fn guard; and the cpu backend (per-query-block SDPA over gathered key blocks)
against the float64 masked oracle on every plan type."""

import logging
import warnings

import pytest
import torch

import vidattn
from vidattn import backends
from vidattn import Dense, Neighborhood, TokenLayout
from vidattn.kernels.cpu_gather import block_sparse_attention_cpu
from vidattn.kernels.reference import block_sparse_attention_reference
from vidattn.plan import PARTIAL, FULL, TokenRule, plan_from_block_mask


def oracle(q, k, v, mask, scale=None):
    """float64 dense attention with a token mask [h, S, S] (or [B, h, S, S]); rows with no
    allowed key are 0."""
    qh, kh, vh = (t.transpose(1, 2).double() for t in (q, k, v))
    rep = qh.shape[1] // kh.shape[1]
    kh, vh = kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1)
    m = mask if mask.dim() == 4 else mask[None]
    s = torch.einsum("bhqd,bhkd->bhqk", qh, kh) * (q.shape[-1] ** -0.5 if scale is None else scale)
    s = s.masked_fill(~m, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bhkd->bhqd", p, vh).transpose(1, 2)


@pytest.fixture
def registry():
    """Backends registered by a test are removed after it; warning/log memory is cleared."""
    before = dict(backends._registry)
    backends._warned.clear()
    backends._logged.clear()
    yield backends
    backends._registry.clear()
    backends._registry.update(before)
    backends._warned.clear()
    backends._logged.clear()


def _qkv(S=40, H=2, Hk=2, D=16, B=1, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, S, H, D, generator=g, dtype=dtype),
            torch.randn(B, S, Hk, D, generator=g, dtype=dtype),
            torch.randn(B, S, Hk, D, generator=g, dtype=dtype))


# ----------------------------------------------------------------------------- registry
def test_bug_inside_a_backend_propagates(registry):
    def buggy(q, k, v, plan, scale=None, return_lse=False):
        raise ZeroDivisionError("a bug")

    registry.register_backend("buggy", buggy, differentiable=True)
    lay = TokenLayout((5, 8))
    q, k, v = _qkv(S=lay.seq_len)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either
        with pytest.raises(ZeroDivisionError, match="a bug"):
            vidattn.sparse_attention(q, k, v, Dense(block_size=16), lay, backend="buggy")


def test_flex_error_propagates_instead_of_falling_back(registry, monkeypatch):
    import vidattn.kernels.flex as flex

    def broken(*a, **kw):
        raise RuntimeError("lowering failed")

    monkeypatch.setattr(flex, "_flex_fn", lambda device: broken)
    lay = TokenLayout((5, 8))
    q, k, v = _qkv(S=lay.seq_len)
    with pytest.raises(RuntimeError, match="lowering failed"):
        vidattn.sparse_attention(q, k, v, Dense(block_size=16), lay, backend="flex")


def test_declared_refusal_falls_back_with_exactly_one_warning(registry):
    calls = []

    def never(q, k, v, plan, scale=None, return_lse=False):
        calls.append(1)
        raise AssertionError("must not run")

    registry.register_backend("picky", never, lambda plan, q, k, v: (False, "picky refuses"), differentiable=True,
                              fallback=("reference",))
    lay = TokenLayout((5, 8))
    q, k, v = _qkv(S=lay.seq_len)
    pat = Neighborhood(kernel_size=(3, 5))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out1 = vidattn.sparse_attention(q, k, v, pat, lay, backend="picky")
        out2 = vidattn.sparse_attention(q, k, v, pat, lay, backend="picky")
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "picky refuses" in msgs[0] and "'reference'" in msgs[0], msgs
    assert not calls
    ref = oracle(q, k, v, pat.mask(lay))
    torch.testing.assert_close(out1.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2, out1)


def test_runtime_refusal_falls_back(registry):
    from vidattn.errors import BackendUnsupported

    def refuses(q, k, v, plan, scale=None, return_lse=False):
        raise BackendUnsupported("does not fit")

    registry.register_backend("late", refuses, differentiable=True, fallback=("cpu",))
    lay = TokenLayout((5, 8))
    q, k, v = _qkv(S=lay.seq_len)
    with pytest.warns(RuntimeWarning, match="does not fit"):
        out = vidattn.sparse_attention(q, k, v, Dense(block_size=16), lay, backend="late")
    torch.testing.assert_close(out.double(), oracle(q, k, v, torch.ones(1, 40, 40, dtype=torch.bool)), atol=1e-5,
                               rtol=1e-5)


def test_auto_picks_cpu_on_cpu_and_logs_why_once(registry, caplog):
    lay = TokenLayout((5, 8))
    q, k, v = _qkv(S=lay.seq_len)
    with caplog.at_level(logging.INFO, logger="vidattn"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # auto's choice is a log line, never a warning
            for _ in range(2):
                vidattn.sparse_attention(q, k, v, Dense(block_size=16), lay)
    assert registry.ran.get("cpu", 0) >= 2  # what ran is recorded (for reports)
    lines = [r.getMessage() for r in caplog.records if "backend 'auto'" in r.getMessage()]
    assert len(lines) == 1 and "'cpu'" in lines[0] and "triton:" in lines[0], lines


def test_unknown_backend_and_register_checks(registry):
    lay = TokenLayout((5, 8))
    q, k, v = _qkv(S=lay.seq_len)
    with pytest.raises(ValueError, match="backend must be one of"):
        vidattn.sparse_attention(q, k, v, Dense(), lay, backend="nope")
    with pytest.raises(ValueError, match="auto"):
        registry.register_backend("auto", lambda *a, **k: None)
    assert {"reference", "cpu", "flex", "triton", "auto"} <= set(registry.backend_names())


def test_non_differentiable_output_is_an_error_not_a_silent_detach(registry):
    def detached(q, k, v, plan, scale=None, return_lse=False):
        return block_sparse_attention_reference(q.detach(), k.detach(), v.detach(), plan, scale)

    registry.register_backend("liar", detached, differentiable=True)
    lay = TokenLayout((5, 8))
    q, k, v = (t.requires_grad_(True) for t in _qkv(S=lay.seq_len))
    with pytest.raises(RuntimeError, match="without autograd history"):
        vidattn.sparse_attention(q, k, v, Dense(block_size=16), lay, backend="liar")
    with torch.no_grad():  # no grad needed: fine
        vidattn.sparse_attention(q, k, v, Dense(block_size=16), lay, backend="liar")


def test_backend_without_backward_is_skipped_when_grad_is_needed(registry):
    calls = []

    def fwd_only(q, k, v, plan, scale=None, return_lse=False):
        calls.append(1)
        return block_sparse_attention_reference(q.detach(), k.detach(), v.detach(), plan, scale)

    registry.register_backend("fwd", fwd_only, differentiable=False, fallback=("cpu",))
    lay = TokenLayout((5, 8))
    q, k, v = (t.requires_grad_(True) for t in _qkv(S=lay.seq_len))
    pat = Neighborhood(kernel_size=(3, 3))
    with pytest.warns(RuntimeWarning, match="no backward"):
        out = vidattn.sparse_attention(q, k, v, pat, lay, backend="fwd")
    assert not calls and out.grad_fn is not None
    out.square().sum().backward()
    q2, k2, v2 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    oracle(q2, k2, v2, pat.mask(lay)).square().sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4, rtol=1e-4)


def test_available_backends_lists_the_registry():
    av = vidattn.available_backends("cpu")
    assert av["reference"] == "ok" and av["cpu"] == "ok"
    assert "triton" in av and "flex" in av


# ----------------------------------------------------------------------------- cpu backend
class _ParityRule(TokenRule):
    """Per-head rule (query parity selects key parity): exercises per-head partial masks."""

    def __call__(self, h, q_idx, k_idx):
        return ((q_idx + k_idx + h) % 3 != 0) | (q_idx == k_idx)


def _random_plan(S, H, bq, bk, perm_heads, seed, batch=1):
    g = torch.Generator().manual_seed(seed)
    nqb, nkb = -(-S // bq), -(-S // bk)
    cls = torch.randint(0, 3, (batch, H, nqb, nkb), generator=g).to(torch.int8)  # EMPTY / PARTIAL / FULL
    cls[..., 0, :] = 0  # query block 0 attends nothing: its rows must be 0
    perm = None
    if perm_heads:
        perm = torch.stack([torch.randperm(S, generator=g) for _ in range(perm_heads)])
    return plan_from_block_mask(cls, seq_len=S, block_q=bq, block_k=bk, rule=_ParityRule(), perm=perm,
                                token_density=0.5)


@pytest.mark.parametrize("case", [
    dict(S=40, H=2, Hk=2, bq=16, bk=16, perm=0),  # ragged tail, partial + full blocks
    dict(S=48, H=4, Hk=1, bq=16, bk=8, perm=0),  # MQA, bq != bk
    dict(S=37, H=2, Hk=1, bq=8, bk=16, perm=2),  # per-head permutations with GQA, ragged
    dict(S=32, H=2, Hk=2, bq=16, bk=16, perm=1, batch=2),  # shared permutation, per-batch plan
])
def test_cpu_backend_matches_oracle_on_random_plans(case):
    B = case.get("batch", 1)
    plan = _random_plan(case["S"], case["H"], case["bq"], case["bk"], case["perm"], seed=case["S"], batch=B)
    q, k, v = _qkv(S=case["S"], H=case["H"], Hk=case["Hk"], B=B, seed=3)
    out, lse = block_sparse_attention_cpu(q, k, v, plan, scale=0.3, return_lse=True)
    mask = plan.token_mask()  # [Bp, Hp, S, S]
    torch.testing.assert_close(out.double(), oracle(q, k, v, mask, scale=0.3), atol=1e-5, rtol=1e-5)
    _, lse_ref = block_sparse_attention_reference(q, k, v, plan, scale=0.3, return_lse=True)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", [Neighborhood(kernel_size=(3, 3, 3)), Neighborhood(kernel_size=(2, 3, 3),
                                     dilation=(1, 1, 2), is_causal=(True, False, False)), Dense(block_size=32)])
def test_cpu_backend_neighborhood_prefix_gqa(pattern):
    lay = TokenLayout((4, 5, 6), prefix=3, suffix=2)
    q, k, v = _qkv(S=lay.seq_len, H=4, Hk=2, B=2, seed=5)
    out = vidattn.sparse_attention(q, k, v, pattern, lay, backend="cpu")
    torch.testing.assert_close(out.double(), oracle(q, k, v, pattern.mask(lay, num_heads=4)), atol=1e-5, rtol=1e-5)


def test_cpu_backend_half_and_double():
    lay = TokenLayout((4, 8))
    pat = Neighborhood(kernel_size=(3, 3))
    for dt, tol in ((torch.bfloat16, 2e-2), (torch.float16, 2e-3), (torch.float64, 1e-12)):
        q, k, v = _qkv(S=lay.seq_len, dtype=dt)
        out = vidattn.sparse_attention(q, k, v, pat, lay, backend="cpu")
        assert out.dtype == dt
        torch.testing.assert_close(out.double(), oracle(q, k, v, pat.mask(lay)), atol=tol, rtol=tol)


def test_cpu_backend_refuses_fused_rectification(registry):
    from vidattn.plan import Rectification

    S = 32
    cls = torch.full((1, 1, 2, 2), FULL, dtype=torch.int8)
    plan = plan_from_block_mask(cls, seq_len=S, block_q=16, block_k=16, rule=None, token_density=1.0,
                                rectification=Rectification(kept_log_scale=torch.zeros(1, 1, 2, 2)))
    q, k, v = _qkv(S=S)
    ok, why = registry.get_backend("cpu").can_run(plan, q, k, v)
    assert not ok and "rectification" in why
    out = vidattn.run_plan(q, k, v, plan)  # auto: the reference backend runs it, no warning needed
    torch.testing.assert_close(out.double(), oracle(q, k, v, torch.ones(1, S, S, dtype=torch.bool)), atol=1e-5,
                               rtol=1e-5)
    assert PARTIAL == 1


# ----------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("make", [lambda: Dense(block_size=16), lambda: Neighborhood(kernel_size=(3, 3))])
def test_sparse_attention_compiles_fullgraph_with_pattern_built_inside(make):
    lay = TokenLayout((4, 8))
    q, k, v = _qkv(S=lay.seq_len)

    def f(q, k, v):
        return vidattn.sparse_attention(q, k, v, make(), lay, backend="cpu")

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    torch.testing.assert_close(out.double(), oracle(q, k, v, make().mask(lay)), atol=1e-5, rtol=1e-5)
