"""`vidattn` command line: builds the parser from :mod:`vidattn.commands` and dispatches.

    vidattn generate [--model reference|tiny|DIR] [--pattern NAME] [pattern options] --out DIR
    vidattn quality [...]
    vidattn bench [attention|model|timm|parallel] [...]
    vidattn info
    vidattn --version

Each subcommand lives in its own module ``vidattn.commands.<name>`` (``add_parser`` / ``run``).
Every bad argument gives one line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vidattn.commands import COMMANDS, EXIT_USAGE, UsageError
from vidattn.pipelines.generate import ModelError  # light: torch + numpy only

__all__ = ["main", "build_parser", "UsageError"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the usage block too)
        raise UsageError(f"{self.prog}: {message}")


def _command_modules() -> dict:
    """name -> command module, for the modules of :data:`COMMANDS` present in this build."""
    mods = {}
    for name in COMMANDS:
        try:
            mods[name] = importlib.import_module(f"vidattn.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"vidattn.commands.{name}":
                raise
    return mods


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``vidattn`` command (errors raise :class:`UsageError`)."""
    from vidattn import __version__

    p = _Parser(prog="vidattn", description="Sparse attention for video/vision diffusion transformers.")
    p.add_argument("--version", action="version", version=f"vidattn {__version__}",
                   help="print the vidattn version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND",
                           help="vidattn COMMAND --help shows its options")
    for mod in _command_modules().values():
        mod.add_parser(sub)
    return p


def main(argv=None) -> int:
    """Console entry point. Returns the exit code (0 ok, 2 bad arguments, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        mods = _command_modules()
        if argv and argv[0] == "bench" and "bench" in mods:  # pass everything after `bench NAME` through
            ns = argparse.Namespace(command="bench", rest=argv[2:], which=argv[1] if len(argv) > 1 else None)
            if ns.which in ("-h", "--help"):
                build_parser().parse_args(["bench", "--help"])
            return mods["bench"].run(ns)
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # report an unknown flag against the subcommand it was given to
            prog = f"vidattn {args.command}" if getattr(args, "command", None) else "vidattn"
            raise UsageError(f"{prog}: unrecognized arguments: {' '.join(extra)} (see {prog} --help)")
        if args.command is None:
            parser.print_help()
            return 0
        return mods[args.command].run(args)
    except (UsageError, ModelError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print("interrupted: no half-written files were left", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
