"""The ``vidattn`` subcommands, one module each (``vidattn/cli.py`` only builds the parser and dispatches).

A command module ``vidattn.commands.<name>`` provides:

* ``add_parser(sub) -> argparse.ArgumentParser``: add its subparser to ``sub`` (the
  ``add_subparsers`` action of the ``vidattn`` parser; its parsers raise :class:`UsageError`);
* ``run(args) -> int``: run the command; bad arguments raise :class:`UsageError` (the CLI prints
  one ``error:`` line and exits with code 2).

:data:`COMMANDS` lists the modules in the order ``vidattn --help`` shows them; a listed module
that is not part of this build is skipped.
"""

from __future__ import annotations

import os

__all__ = ["COMMANDS", "UsageError", "EXIT_USAGE", "check_device", "check_out"]

COMMANDS = ("generate", "quality", "calibrate", "finetune", "bench", "info")

EXIT_USAGE = 2


class UsageError(ValueError):
    """A bad command-line argument (reported as one line, exit code 2)."""


def check_device(device) -> None:
    """Raise :class:`UsageError` unless ``device`` (a string or None) names a usable torch device."""
    if device is not None:
        import torch

        try:
            dev = torch.device(device)
        except RuntimeError:
            raise UsageError(f"--device must be a torch device like cpu or cuda:0, got {device!r}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is available here")


def check_out(out: str, overwrite: bool) -> None:
    """Raise :class:`UsageError` unless ``out`` is a new or empty folder (or ``overwrite``)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out!r} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UsageError(f"--out {out!r} is not empty (use --overwrite to write into it)")


def preset_list(text: str, flag: str) -> list:
    """The comma-separated quality-preset names of ``text`` (``--patterns`` / ``--families``),
    each checked against :func:`vidattn.quality.presets.preset_names`; UsageError otherwise."""
    from vidattn.quality.presets import preset_names

    names = [x.strip() for x in str(text).split(",") if x.strip()]
    known = preset_names()
    if not names or [x for x in names if x not in known]:
        raise UsageError(f"{flag} must be a comma-separated subset of {','.join(known)}, got {text!r}")
    return names
