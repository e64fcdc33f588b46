"""`vidattn info`: versions, GPU, usable backends, the triton backend's forward kernel and its
quantised precisions."""

from __future__ import annotations

import importlib
import sys

__all__ = ["add_parser", "run"]


def add_parser(sub):
    return sub.add_parser("info", help="versions, GPU and usable backends")


def _version(mod):
    try:
        m = importlib.import_module(mod)
        return getattr(m, "__version__", "installed")
    except Exception as e:
        return f"not installed ({type(e).__name__})"


def _forward_kernel(dev: str) -> str:
    """Which forward kernel the triton backend runs here: the Hopper Gluon kernel or the portable one."""
    from vidattn.kernels.sparse_flash_gluon_launch import gluon_available, gluon_mode

    if dev != "cuda":
        return "portable (the Gluon kernel needs a Hopper GPU, sm_90)"
    import torch

    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        return f"portable (the Gluon kernel is Hopper-only; this GPU is sm_{major}{minor})"
    why = gluon_available()
    if why:
        return f"portable ({why})"
    if gluon_mode() == "0":
        return "portable (VIDATTN_GLUON=0)"
    return ("gluon-hopper for bf16/fp16, head dim 64/128, 64/128-token blocks, native precision or int8 on dense "
            "plans, no rectification; portable otherwise")


_PRECISION_TEXT = {"fp8": "e4m3 Q.K^T, e4m3 P.V", "int8": "int8 Q.K^T, 16-bit P.V",
                   "int8_fp8": "int8 Q.K^T, e4m3 P.V"}


def _precisions(dev: str) -> list:
    """One line per quantised precision of the triton backend: what it quantises and whether it
    runs here (``vidattn.kernels.quant_fp8.fp8_support``'s verdict)."""
    try:
        import torch

        from vidattn.kernels.quant_fp8 import PRECISIONS, fp8_support
    except ImportError as e:  # triton not installed
        return [f"  (none: {e})"]
    lines = []
    for p in PRECISIONS[1:]:
        ok, why = fp8_support(torch.device(dev), p)
        lines.append(f"  {p:<10} {_PRECISION_TEXT.get(p, '')}: {'yes' if ok else 'no, ' + why}")
    return lines


def run(a) -> int:
    import torch

    import vidattn

    print(f"vidattn     {vidattn.__version__}")
    print(f"python      {sys.version.split()[0]}")
    for mod in ("torch", "triton", "diffusers", "transformers", "timm", "xformers", "natten"):
        print(f"{mod:<11} {_version(mod)}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"gpu {i}       {p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})")
        dev = "cuda"
    else:
        print("gpu         none (CPU only)")
        dev = "cpu"
    from vidattn.pipelines.video_io import browser_video_ext, video_codec

    ext = browser_video_ext()
    print(f"video       {ext[1:]} ({video_codec(ext)}{'' if ext == '.mp4' else '; this OpenCV has no H.264 encoder'})")
    print(f"backends on {dev}:")
    for name, status in vidattn.available_backends(dev).items():
        print(f"  {name:<10} {status}")
    print(f"triton forward kernel: {_forward_kernel(dev)}")
    print("triton precisions (opt-in, forward only; precision= / vidattn.precision(...)):")
    for line in _precisions(dev):
        print(line)
    return 0
