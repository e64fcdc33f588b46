"""Options and checks shared by the commands that run a video model (quality, calibrate, finetune).

Not a command itself (:data:`vidattn.commands.COMMANDS` does not list it).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Optional

from . import UsageError

__all__ = ["add_harness_model", "add_reference_version", "check_harness_model", "add_size_options", "add_quiet_json", "harness_imports"]

HARNESS_MODELS = ("reference", "tiny-wan")


def add_harness_model(p) -> None:
    """``--model``: a model the quality harness loads (reference, tiny-wan or a local checkpoint folder)."""
    p.add_argument("--model", default="reference", help="reference (default), tiny-wan or a local checkpoint dir")


def add_reference_version(p) -> None:
    """``--version``: which reference model (1 or 2; None: the shipped default)."""
    p.add_argument("--version", type=int, default=None, help="reference model version (1 or 2; default: the shipped default)")


def check_harness_model(model: str) -> None:
    """Raise :class:`UsageError` unless ``model`` is a harness model name or an existing folder."""
    if model not in HARNESS_MODELS and not os.path.isdir(model):
        raise UsageError(f"--model {model!r}: not reference, tiny-wan, or an existing local checkpoint folder")


def add_size_options(p, steps_flag: str = "--steps", steps_help: Optional[str] = None) -> None:
    """``--frames``, ``--height``, ``--width`` and the sampling-steps flag ``steps_flag`` (ints; None:
    the model's default)."""
    for flag in ("--frames", "--height", "--width"):
        p.add_argument(flag, type=int, default=None)
    p.add_argument(steps_flag, type=int, default=None, help=steps_help)


def add_quiet_json(p, json_help: str) -> None:
    """``--quiet`` and ``--json`` (what ``--json`` prints: ``json_help``)."""
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help=json_help)


@contextmanager
def harness_imports(command: str):
    """Import the quality harness inside this block: an ImportError becomes a :class:`UsageError`
    saying the harness is not part of this build."""
    try:
        yield
    except ImportError as e:
        raise UsageError(f"vidattn {command}: the quality harness is not available in this build ({e})") from None
