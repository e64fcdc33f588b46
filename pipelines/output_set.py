"""A run's output folder, written as one set: staged in a temporary folder, moved into place at the end.

``OutputSet(out, overwrite)`` checks, before any model is loaded, that ``out`` can be written
(the staging folder is created next to it, on the same filesystem, so an unwritable location such
as ``/proc/x`` or a read-only folder fails here with :class:`OutputError`). Every file of the run
is written into :attr:`OutputSet.staging`; :meth:`OutputSet.commit` then replaces ``out`` by the
staged folder with renames (no copy), so ``out`` holds either the previous complete set or the new
complete set, never a mixture and never a partial set: nothing of an earlier run (a
``report.html`` or ``side_by_side.*`` the new run does not write) survives ``--overwrite``.
:meth:`OutputSet.discard` (also on any exception or Ctrl-C inside ``with OutputSet(...)``)
removes the staging folder and leaves ``out`` as it was.

``--overwrite`` only replaces a folder that holds nothing but a previous run's outputs (names in
:data:`OUTPUT_NAMES`); a folder with other files is refused, so no user file is ever deleted.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

__all__ = ["OutputError", "OutputSet", "OUTPUT_NAMES", "is_output_name"]

# every name a `vidattn generate` run writes (and may have written in earlier versions)
OUTPUT_NAMES = re.compile(r"^(video|dense|side_by_side)\.(mp4|webm)$|^frames\.png$|^report\.(json|html)$")
_STAGING_PREFIX = ".vidattn-staging-"
_OLD_PREFIX = ".vidattn-old-"


class OutputError(ValueError):
    """The output folder cannot be used (reported as one ``error:`` line, exit code 2)."""


def is_output_name(name: str) -> bool:
    """True for a file name a ``vidattn generate`` run writes (or a leftover staging folder)."""
    return bool(OUTPUT_NAMES.match(name)) or name.startswith((_STAGING_PREFIX, _OLD_PREFIX))


def _existing_ancestor(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        parent = os.path.dirname(p)
        if parent == p:
            break
        if os.path.exists(p):  # a file where a folder is needed
            raise OutputError(f"--out {path!r}: {p!r} exists and is not a folder")
        p = parent
    return p


class OutputSet:
    """The staged output folder of one run (see the module docstring).

    Args:
        out: the final output folder (created with its parents on :meth:`commit`).
        overwrite: replace an existing non-empty ``out`` that holds only a previous run's outputs.
    Raises:
        OutputError: ``out`` is a file, is not empty (without ``overwrite``), holds other files
            than a previous run's outputs (with ``overwrite``), or cannot be written.
    """

    def __init__(self, out: str, overwrite: bool = False):
        self.out = os.path.abspath(out)
        self._arg = out
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise OutputError(f"--out {out!r} exists and is not a folder")
        if os.path.isdir(self.out):
            entries = sorted(os.listdir(self.out))
            if entries and not overwrite:
                raise OutputError(f"--out {out!r} is not empty (use --overwrite to replace a previous run's output)")
            foreign = [e for e in entries if not is_output_name(e)]
            if foreign:
                raise OutputError(f"--out {out!r} holds files that are not a vidattn generate output "
                                  f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                                  f"--overwrite only replaces a previous run's output folder")
        base = _existing_ancestor(os.path.dirname(self.out))
        try:
            self.staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=base)
            probe = os.path.join(self.staging, ".write-test")
            with open(probe, "wb") as fh:
                fh.write(b"x")
            os.remove(probe)
        except OSError as e:
            if getattr(self, "staging", None):
                shutil.rmtree(self.staging, ignore_errors=True)
            raise OutputError(f"--out {out!r}: cannot write there ({e.strerror or type(e).__name__})") from None
        self._done = False

    def path(self, name: str) -> str:
        """Path of file ``name`` inside the staging folder."""
        return os.path.join(self.staging, name)

    def files(self):
        """Names of the files staged so far (sorted)."""
        return sorted(os.listdir(self.staging)) if os.path.isdir(self.staging) else []

    def commit(self) -> None:
        """Move the staged set to ``out``, replacing a previous set in one rename each way."""
        if self._done:
            return
        try:
            os.makedirs(os.path.dirname(self.out), exist_ok=True)
            os.chmod(self.staging, 0o755)  # mkdtemp makes 0700; results are meant to be shared
            old = None
            if os.path.isdir(self.out):
                old = tempfile.mkdtemp(prefix=_OLD_PREFIX, dir=os.path.dirname(self.out))
                os.rmdir(old)
                os.rename(self.out, old)
            try:
                os.rename(self.staging, self.out)
            except BaseException:
                if old is not None:
                    os.rename(old, self.out)  # put the previous set back
                raise
        except OSError as e:
            self.discard()
            raise OutputError(f"--out {self._arg!r}: cannot move the output into place "
                              f"({e.strerror or type(e).__name__})") from None
        self._done = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """Remove the staging folder (``out`` is left as it was)."""
        if not self._done:
            shutil.rmtree(self.staging, ignore_errors=True)
            self._done = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.discard()
        return False
