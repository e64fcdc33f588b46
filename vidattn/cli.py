"""`vidattn` command line (thin: parses arguments, calls vidattn.pipelines / vidattn.quality)."""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidattn", description="Sparse attention for video/vision diffusion transformers.")
    sub = p.add_subparsers(dest="command")
    for name, help_ in (("generate", "generate a video with sparse attention"), ("bench", "benchmarks"),
                        ("quality", "sparse vs dense quality harness"), ("info", "versions and usable backends")):
        sub.add_parser(name, help=help_)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 0
    print(f"vidattn {args.command}: not implemented yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
