"""Per-transformer state: token layout, denoising step, layer indices, stats.

Two hooks feed :class:`ModelState`:

* a ``torch`` forward pre-hook on the transformer (``register_forward_pre_hook(with_kwargs=True)``)
  reads the call's arguments and records the latent grid and text position
  (:mod:`layout_discovery`). It runs in ``Module.__call__``, before ``forward``: so before every
  diffusers ``HookRegistry`` hook (those rewrite ``forward``; diffusers' context-parallel hooks
  split ``hidden_states`` / ``img_ids`` there, and this hook must see the full inputs whichever of
  ``vidattn.apply`` / ``enable_parallelism`` came first), and outside a ``torch.compile`` of the
  model (reading FLUX's ``img_ids`` is a host read that ``fullgraph=True`` cannot trace);
* a diffusers :class:`~diffusers.hooks.ModelHook` (``VidattnStepHook``, registered in the
  transformer's ``HookRegistry`` as ``"vidattn_step"``) that is *stateful*: pipelines wrap each
  transformer call in ``transformer.cache_context(name, step_index=..., ...)``, which diffusers
  hands to every stateful hook's ``StateManager``; the step is read from it
  (``CacheContext.step_index``) and, when a pipeline does not provide one, counted from the
  ``timestep`` values (a new timestep = a new step; a larger one = a new pipeline call).
  ``transformer._reset_stateful_cache()`` / ``reset_stateful_hooks`` reset the count.

A processor installed by hand (``transformer.set_attn_processor(SparseAttnProcessor(p))``) is not
told by diffusers which model it went into: :func:`watch_for_owner` finds it with process-wide
module forward hooks (public torch API) on the first call of its transformer, then creates the
state and hooks above; every later call uses them. ``vidattn.apply`` needs none of that.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from vidattn.layout import TokenLayout
from vidattn.patterns.base import Pattern

from .diffusers_compat import mark_stateful
from .families import FAMILIES
from .layout_discovery import LayoutRecord, call_arguments, family_of, layout_from_call

__all__ = ["AttentionStats", "ModelState", "model_state", "is_self_attention", "attention_modules", "STEP_HOOK",
           "watch_for_owner", "OWNER_ATTR"]

_STATE_ATTR = "_vidattn_state"
STEP_HOOK = "vidattn_step"


@dataclass
class AttentionStats:
    """Counters read by the CLI / quality harness.

    sparse_calls: self-attention calls executed with the sparse pattern.
    dense_calls: self-attention calls kept dense by the schedule (``dense_steps`` /
        ``dense_layers``), because the sequence did not match the layout, or because no layout
        could be discovered.
    layout: the last :class:`TokenLayout` attended over (grid + text prefix/suffix).
    grid: latent grid recorded by the pre-hook on the last transformer call.
    densities: layer index -> block density of the last plan run in that layer.
    token_densities: layer index -> token density of that plan (fraction of (query, key) pairs).
    steps_seen: denoising steps seen since the last reset.
    cp_calls: sparse calls run under diffusers context parallelism (Ulysses / Ring / both).
    ring_shard_calls: Ring steps run with a per-(query shard, key shard) plan slice.
    ring_gathered_calls: sparse Ring calls that fell back to all-gathered K/V (one warning says why).
    head_work: layer -> per-head block counts of the last plan under Ulysses (global head ids;
        the local heads only), for the head load-balance report.
    """

    sparse_calls: int = 0
    dense_calls: int = 0
    layout: Optional[TokenLayout] = None
    grid: Optional[Tuple[int, ...]] = None
    densities: Dict[int, float] = field(default_factory=dict)
    token_densities: Dict[int, float] = field(default_factory=dict)
    steps_seen: int = 0
    cp_calls: int = 0
    ring_shard_calls: int = 0
    ring_gathered_calls: int = 0
    head_work: Dict[int, Dict[int, float]] = field(default_factory=dict)

    def reset(self) -> None:
        """Zero the counters (layout / grid kept)."""
        self.sparse_calls = self.dense_calls = self.cp_calls = self.ring_shard_calls = self.ring_gathered_calls = 0
        self.densities.clear()
        self.token_densities.clear()
        self.head_work.clear()

    @property
    def mean_density(self) -> Optional[float]:
        """Mean block density over layers of the last plans, None before any sparse call."""
        if not self.densities:
            return None
        return sum(float(d) for d in self.densities.values()) / len(self.densities)


def is_self_attention(name: str, module) -> bool:
    """True for attention modules over video/image tokens (not cross-attention, not text refiners)."""
    if getattr(module, "is_cross_attention", False):
        return False
    last = name.rsplit(".", 1)[-1]
    if last in ("attn2", "cross_attn", "attn_cross") or "token_refiner" in name or "context_embedder" in name:
        return False
    if getattr(module, "cross_attention_dim_head", None) is not None:  # Wan cross-attention
        return False
    return True


def attention_modules(model) -> Dict[str, torch.nn.Module]:
    """name -> module for every sub-module carrying a diffusers attention ``processor``."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "processor") and hasattr(m, "set_processor")}


def _step_hook_class():
    from diffusers.hooks import ModelHook
    from diffusers.hooks.hooks import StateManager

    class _NoState:
        def reset(self):
            pass

    class VidattnStepHook(ModelHook):
        """Stateful diffusers hook: receives the pipeline's ``cache_context`` (``step_index``)
        and resets vidattn's step count with the other stateful hooks. ``pre_forward`` passes
        the arguments through unchanged (traceable by ``torch.compile``)."""

        def __init__(self, state: "ModelState"):
            super().__init__()
            self._state_ref = weakref.ref(state)
            self.state_manager = StateManager(_NoState)

        def context(self):
            """The pipeline's current ``CacheContext`` or None."""
            try:
                return self.state_manager.context
            except ValueError:  # no cache_context around this call
                return None

        def reset_state(self, module):
            st = self._state_ref()
            if st is not None:
                st.reset_steps()
            return module

    return mark_stateful(VidattnStepHook)


class ModelState:
    """Per-transformer state: layout pre-hook, step hook, layer indices, stats.

    Stored on the model (``model._vidattn_state``). ``step`` is the pipeline's ``step_index``
    when it calls the transformer inside ``cache_context(..., step_index=i)``, else counted from
    timesteps: a transformer call with a new ``timestep`` value advances it (CFG's second forward
    at the same timestep does not); a timestep larger than the previous one (a new pipeline call)
    resets it to 0.
    """

    def __init__(self, model):
        self._model = weakref.ref(model)
        self.family = family_of(model)
        self.info = FAMILIES[self.family]
        self.rank = self.info.grid_rank
        self.record: Optional[LayoutRecord] = None
        self.layout_error: Optional[str] = None
        self.step = 0
        self._last_t: Optional[float] = None
        self.stats = AttentionStats()
        self._layouts: Dict[tuple, Optional[TokenLayout]] = {}
        self.patterns: Dict[int, Pattern] = {}  # validated against each new grid
        self._dense_flags: Dict[int, bool] = {}  # dense_steps value -> "this step is dense"
        mods = attention_modules(model)
        names = [n for n, m in mods.items() if is_self_attention(n, m)]
        self.layer_of: Dict[int, int] = {id(mods[n]): i for i, n in enumerate(names)}
        self.self_attention: Dict[int, bool] = {id(m): is_self_attention(n, m) for n, m in mods.items()}
        self.layer_names = names
        self._hook = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        self._step_hook = None
        try:
            from diffusers.hooks import HookRegistry

            reg = HookRegistry.check_if_exists_or_initialize(model)
            if reg.get_hook(STEP_HOOK) is not None:
                reg.remove_hook(STEP_HOOK, recurse=False)
            self._step_hook = _step_hook_class()(self)
            reg.register_hook(self._step_hook, STEP_HOOK)
        except ImportError:  # pragma: no cover - diffusers without hooks: timestep counting only
            self._step_hook = None

    # ------------------------------------------------------------------ hook
    @torch.compiler.disable
    def _pre_hook(self, module, args, kwargs):
        bound = call_arguments(module, args, kwargs)
        try:
            rec = layout_from_call(module, (), bound)
        except ValueError as e:
            self._no_layout(str(e))
            self._advance(bound.get("timestep"))
            return None
        self.layout_error = None
        self._set_record(rec)
        self._advance(bound.get("timestep"))
        n = 1
        for g in rec.grid:
            n *= g
        self.layout_for(n + rec.extra_suffix)
        ehs = bound.get("encoder_hidden_states")
        if rec.text is not None and isinstance(ehs, torch.Tensor) and ehs.dim() == 3:
            self.layout_for(n + rec.extra_suffix + int(ehs.shape[1]))
        return None

    def _no_layout(self, why: str) -> None:
        from vidattn.patterns.dense import Dense

        needs_grid = any(type(p) is not Dense for p in self.patterns.values())
        if self.layout_error is None and needs_grid:  # Dense() needs no grid: nothing lost, no warning
            warnings.warn(f"vidattn: no token layout for this {type(self._model()).__name__} call ({why}); "
                          f"its attention runs dense", RuntimeWarning, stacklevel=4)
        self.layout_error = why
        self.record = None
        self.stats.grid = None

    def _set_record(self, rec: LayoutRecord) -> None:
        if rec == self.record:
            return  # keep the same object: compiled graphs guard on it
        grid_layout = TokenLayout(rec.grid)
        for p in list(self.patterns.values()):
            p.validate(grid_layout)  # e.g. kernel larger than the grid: clear ValueError, no compute yet
        self.record = rec
        self.stats.grid = rec.grid

    def _advance(self, t) -> None:
        ctx = self._step_hook.context() if self._step_hook is not None else None
        idx = getattr(ctx, "step_index", None)
        if idx is not None:
            if int(idx) != self.step or self._last_t is None:
                if int(idx) == 0 or self._last_t is None:
                    self.stats.steps_seen = 1
                elif int(idx) != self.step:
                    self.stats.steps_seen += 1
            self.step = int(idx)
            self._last_t = float(idx)
            self._update_flags()
            return
        if t is None:
            return
        if isinstance(t, torch.Tensor):
            t = t.detach().reshape(-1)[:1].float().cpu().item() if t.numel() else None
        if t is None:
            return
        t = float(t)
        if self._last_t is None or t > self._last_t:
            self.step = 0
            self.stats.steps_seen = 1
        elif t != self._last_t:
            self.step += 1
            self.stats.steps_seen += 1
        self._last_t = t
        self._update_flags()

    def _update_flags(self) -> None:
        for n in list(self._dense_flags):
            flag = self.step < n
            if self._dense_flags[n] != flag:
                self._dense_flags[n] = flag

    def dense_step(self, dense_steps: int) -> bool:
        """Whether the current step is among the first ``dense_steps`` (a bool the hook keeps
        up to date, so compiled graphs guard on a bool, not on the step number)."""
        if dense_steps <= 0:
            return False
        flag = self._dense_flags.get(dense_steps)
        if flag is None:
            flag = self._dense_flags[dense_steps] = self.step < dense_steps
        return flag

    def layout_for(self, S: int) -> Optional[TokenLayout]:
        """TokenLayout of a self-attention sequence of ``S`` tokens under the current record
        (text tokens = ``S - prod(grid)``), None if ``S`` does not fit or no layout is known.
        Cached, so compiled graphs see a constant object."""
        rec = self.record
        if rec is None:
            return None
        key = (rec, S)
        lay = self._layouts.get(key)
        if lay is None and key not in self._layouts:
            lay = _layout_for(rec, S)
            if len(self._layouts) > 64:
                self._layouts.clear()
            self._layouts[key] = lay
        return lay

    def reset_steps(self) -> None:
        """Start counting denoising steps from 0 at the next transformer call."""
        self._last_t = None
        self.step = 0
        self._update_flags()

    def add_pattern(self, pattern: Pattern) -> None:
        """Check ``pattern``'s grid rank now (and its sizes on every new grid)."""
        _check_rank(pattern, self.rank, self.family)
        self.patterns[id(pattern)] = pattern
        if self.record is not None:
            pattern.validate(TokenLayout(self.record.grid))

    def detach(self, model) -> None:
        """Remove both hooks and the state from ``model``."""
        self._hook.remove()
        if self._step_hook is not None:
            from diffusers.hooks import HookRegistry

            reg = HookRegistry.check_if_exists_or_initialize(model)
            if reg.get_hook(STEP_HOOK) is self._step_hook:
                reg.remove_hook(STEP_HOOK, recurse=False)
        if model.__dict__.get(_STATE_ATTR) is self:
            del model.__dict__[_STATE_ATTR]


def _layout_for(rec: LayoutRecord, S: int) -> Optional[TokenLayout]:
    n = 1
    for g in rec.grid:
        n *= g
    extra = S - n - rec.extra_suffix
    if extra < 0 or (extra > 0 and rec.text is None):
        return None
    pre, suf = (extra, rec.extra_suffix) if rec.text == "prefix" else (0, extra + rec.extra_suffix)
    return TokenLayout(rec.grid, prefix=pre, suffix=suf)


def _check_rank(pattern: Pattern, rank: int, family) -> None:
    big = TokenLayout((4096,) * rank) if rank < 3 else TokenLayout((1024, 1024, 1024))
    if getattr(pattern, "needs_frames", False) and rank != 3:
        raise ValueError(f"{type(pattern).__name__} needs a (T, H, W) video grid but {family} has a {rank}-D grid")
    try:
        pattern.validate(big)
    except ValueError as e:
        raise ValueError(f"{type(pattern).__name__} cannot serve the {rank}-D token grid of {family}: {e}") from None
    ks = getattr(pattern, "kernel_size", None)
    if isinstance(ks, (tuple, list)) and len(ks) != rank:
        raise ValueError(f"kernel_size {tuple(ks)} has {len(ks)} axes but {family} has a {rank}-D token grid")


def model_state(model, create: bool = True) -> Optional[ModelState]:
    """The :class:`ModelState` of ``model`` (created with its hooks if missing and ``create``)."""
    st = model.__dict__.get(_STATE_ATTR)
    if st is None and create:
        st = ModelState(model)
        model.__dict__[_STATE_ATTR] = st
    return st


# =============================================================================== manual binding
OWNER_ATTR = "_vidattn_owner"  # attention module -> weakref of its transformer (set when bound)
_WAITING: "weakref.WeakSet" = weakref.WeakSet()  # hand-installed processors not yet bound to a model
_RERUN: "weakref.WeakSet" = weakref.WeakSet()  # transformers bound during their running call
_handles: list = []
_supported_types: Dict[type, bool] = {}


def watch_for_owner(proc) -> None:
    """Bind a hand-installed processor (``set_attn_processor(SparseAttnProcessor(p))``) to its
    transformer: diffusers tells a processor nothing about the model it went into, so until every
    waiting processor met its model, process-wide module forward hooks (public torch API,
    ``torch.nn.modules.module.register_module_forward_pre_hook`` / ``_forward_hook``) look at each
    call of a supported transformer. The first call of a transformer holding a waiting processor
    creates its :class:`ModelState` (its own hooks serve every later call) and, as the layout is
    in that call's keyword arguments which a global pre-hook does not receive, runs the call
    again once from the forward hook (which does receive them): the first call costs two
    forwards, its output is the sparse one. The global hooks are removed once nothing waits."""
    _WAITING.add(proc)
    if not _handles:
        from torch.nn.modules import module as _m

        _handles.append(_m.register_module_forward_pre_hook(_watch_pre))
        _handles.append(_m.register_module_forward_hook(_watch_post, with_kwargs=True))


def _is_supported(module) -> bool:
    t = type(module)
    ok = _supported_types.get(t)
    if ok is None:
        try:
            ok = family_of(module) is not None
        except TypeError:
            ok = False
        _supported_types[t] = ok
    return ok


def _unwatch_if_idle() -> None:
    if not _WAITING and not _RERUN:
        while _handles:
            _handles.pop().remove()


@torch.compiler.disable
def _watch_pre(module, args):
    if not _WAITING and not _RERUN:  # every waiting processor bound or collected: stop watching
        _unwatch_if_idle()
        return None
    if not _is_supported(module) or module in _RERUN:
        return None
    mods = attention_modules(module)
    waiting = [m.processor for m in mods.values() if m.processor in _WAITING]
    if not waiting:
        _unwatch_if_idle()
        return None
    model_state(module)
    for m in mods.values():
        m.__dict__[OWNER_ATTR] = weakref.ref(module)
    for p in waiting:
        _WAITING.discard(p)
    _RERUN.add(module)
    return None


@torch.compiler.disable
def _watch_post(module, args, kwargs, output):
    if module not in _RERUN:
        return None
    _RERUN.discard(module)
    st = model_state(module, create=False)
    if st is not None:
        st.stats.reset()
    try:
        return module(*args, **kwargs)  # now with the model's own layout hook
    finally:
        _unwatch_if_idle()
