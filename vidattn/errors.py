"""Exception types shared by the dispatcher (:mod:`vidattn.attention`) and the backends
(:mod:`vidattn.kernels`). They live here, below both, so a backend never imports the dispatcher."""

from __future__ import annotations

__all__ = ["BackendUnsupported", "TritonUnsupported", "FlexUnsupported"]


class BackendUnsupported(RuntimeError):
    """A backend declares it cannot run a case (bad for it, not a bug): the dispatcher falls back
    to the next backend with one warning. Any other exception raised inside a backend is a bug
    and propagates."""


class TritonUnsupported(BackendUnsupported):
    """The Triton kernel cannot run this case."""


class FlexUnsupported(BackendUnsupported):
    """The plan uses something FlexAttention cannot express here."""
