"""Shared timing helpers of every vidattn benchmark (and of ``vidattn generate``'s speed column).

One timer for all: :class:`Stopwatch` measures an interval with CUDA events on a CUDA device and
``time.perf_counter`` on CPU. :func:`time_ms` (median of repeated calls after warm-up) and
:class:`ModuleTimer` (total forward time of a set of modules, e.g. every self-attention module of
a transformer) are built on it, so kernels, model steps and attention shares are timed the same way.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, List, Optional

import torch

__all__ = ["sync", "Stopwatch", "time_ms", "loop_ms", "median", "ModuleTimer"]


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda" if device is not None else False


def sync(device) -> None:
    """``torch.cuda.synchronize()`` when ``device`` (a torch device or string) is a CUDA device."""
    if _is_cuda(device):
        torch.cuda.synchronize(torch.device(device))


class Stopwatch:
    """One interval on ``device``: :meth:`start`, :meth:`stop`, then :meth:`elapsed_ms`.

    CUDA: two ``torch.cuda.Event(enable_timing=True)`` recorded on the current stream (no host
    sync until :meth:`elapsed_ms`). CPU: ``time.perf_counter``.
    """

    def __init__(self, device="cpu"):
        self.cuda = _is_cuda(device)
        self._a = self._b = None

    def _mark(self):
        """The current time: a CUDA event recorded on the current stream, or ``perf_counter``."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> "Stopwatch":
        self._a = self._mark()
        return self

    def stop(self) -> "Stopwatch":
        self._b = self._mark()
        return self

    def elapsed_ms(self) -> float:
        """Milliseconds between :meth:`start` and :meth:`stop` (synchronizes on CUDA)."""
        if self._a is None or self._b is None:
            raise RuntimeError("Stopwatch.elapsed_ms() needs start() and stop() first")
        if self.cuda:
            self._b.synchronize()
            return float(self._a.elapsed_time(self._b))
        return (self._b - self._a) * 1e3

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def median(xs: Iterable[float]) -> Optional[float]:
    """Median of ``xs`` (the mean of the two middle values for an even count); None when empty."""
    s = sorted(float(x) for x in xs)
    if not s:
        return None
    m = len(s) // 2
    return s[m] if len(s) % 2 else 0.5 * (s[m - 1] + s[m])


def time_ms(fn: Callable[[], object], device, warmup: int = 1, reps: int = 3) -> float:
    """Median milliseconds of ``reps`` calls of ``fn()`` after ``warmup`` untimed calls, each call
    timed by a :class:`Stopwatch` on ``device``."""
    for _ in range(max(0, int(warmup))):
        fn()
    sync(device)
    times: List[float] = []
    for _ in range(max(1, int(reps))):
        with Stopwatch(device) as sw:
            fn()
        times.append(sw.elapsed_ms())
    return median(times)


def loop_ms(fn: Callable[[], object], device, iters: int, warmup: int = 1) -> float:
    """Mean milliseconds per call of ``iters`` back-to-back calls of ``fn()`` (one :class:`Stopwatch`
    around the whole loop, so launch gaps between calls overlap as in a model), after ``warmup``
    untimed calls."""
    for _ in range(max(0, int(warmup))):
        fn()
    sync(device)
    with Stopwatch(device) as sw:
        for _ in range(max(1, int(iters))):
            fn()
    return sw.elapsed_ms() / max(1, int(iters))


class ModuleTimer:
    """Total forward time of ``modules`` (forward pre/post hooks, one :class:`Stopwatch` per call).

    Args:
        modules: the ``torch.nn.Module`` objects to time (not nested in each other).
        device: where they run (CUDA: events; CPU: wall clock).
    Use :meth:`total_ms` for the time since construction or the last :meth:`reset`, and
    :meth:`remove` (or ``with``) to detach the hooks.
    """

    def __init__(self, modules: Iterable[torch.nn.Module], device="cpu"):
        self.device = device
        self._open: List[Stopwatch] = []
        self._done: List[Stopwatch] = []
        self.calls = 0
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))

    def _pre(self, mod, args):
        self._open.append(Stopwatch(self.device).start())

    def _post(self, mod, args, out):
        if self._open:
            self._done.append(self._open.pop().stop())
            self.calls += 1

    def reset(self) -> None:
        """Forget the calls timed so far."""
        self._done.clear()
        self.calls = 0

    def total_ms(self) -> float:
        """Sum of the timed calls' milliseconds (synchronizes on CUDA)."""
        return float(sum(sw.elapsed_ms() for sw in self._done))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def host_us(fn: Callable[[], object], calls: int = 30) -> float:
    """Host microseconds per call of ``fn`` (a CUDA workload) issued back to back, without
    synchronising inside the loop (the GPU queue absorbs the launches): the Python and launch
    cost a caller pays, not the GPU time."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return round(host, 1)
