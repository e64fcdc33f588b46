"""Build the portable Triton kernel for sm_90 on a machine without a GPU, and report what ptxas
says about it (registers, spill bytes) for each precision and tile.

Two steps, two processes:

1. ``capture`` (under ``TRITON_INTERPRET=1``, CPU tensors): runs the real launcher
   (``block_sparse_attention_triton``) on a small case with the GPU's launch decisions (tile sizes
   from ``launch_config`` as on a GPU, TMA descriptors, no interpreter emulation) and stops at the
   kernel call, writing each argument's Triton type (``*i8``, ``tensordesc<i8[64, 128]>``, ``i32``)
   or constexpr value as JSON.
2. ``build`` (``TRITON_INTERPRET=0``): ``triton.compile`` of ``_sparse_flash_fwd`` with that
   signature for ``cuda:90``, then ``ptxas -v`` on the PTX.

Usage::

    python benchmarks/portable_build.py --precisions bf16,fp8,int8,int8_fp8 --tiles 128x64,128x128

A compile error here is the error the GPU would raise (the front end and the NVIDIA backend are
the same code); the register and spill counts are ptxas's for sm_90a. Timing needs the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Captured(Exception):
    pass


def capture(precision: str | None, block_m: int, block_n: int, head_dim: int = 128, rule: str = "full",
            warps: int = 0, seq_len: int = 1000) -> dict:
    """Kernel arguments of one launcher call, as Triton signature strings / constexpr values.

    Runs in an interpreter process (``TRITON_INTERPRET=1``). ``rule``: ``"full"`` (random full
    blocks), ``"dense"``, or ``"na"`` / ``"gna"`` (the neighborhood window (9, 15, 27), plain or with
    stride (3, 5, 9), on a 12 x 20 x 36 grid: partial blocks and the token rule); ``seq_len`` not a multiple of 128 adds the ragged last key block's loop,
    as on the video shapes. Returns ``dict(signature=..., constexprs=..., num_warps=..., num_stages=...)``.
    """
    import torch

    from vidattn.kernels import sparse_flash_launch as L
    from vidattn.plan import FULL, plan_from_block_mask

    S, H, bq, bk = seq_len, 2, 128, 128
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, S, H, head_dim, generator=g).to(torch.bfloat16) for _ in range(3))
    nq, nk = -(-S // bq), -(-S // bk)
    if rule in ("na", "gna"):  # the Wan setting's window on a smaller grid: partial blocks, token rule
        import vidattn

        layout = vidattn.TokenLayout((12, 20, 36))
        stride = (3, 5, 9) if rule == "gna" else 1
        plan = vidattn.Neighborhood(kernel_size=(9, 15, 27), stride=stride).plan(layout)
        S = layout.seq_len
        q, k, v = (torch.randn(1, S, H, head_dim, generator=g).to(torch.bfloat16) for _ in range(3))
    elif rule == "dense":
        cls = torch.full((1, H, nq, nk), FULL, dtype=torch.int8)
    else:
        idx = torch.argsort(torch.rand(1, H, nq, nk, generator=g), dim=-1)[..., : nk // 2]
        cls = torch.zeros(1, H, nq, nk, dtype=torch.int8).scatter_(-1, idx, FULL)
    if rule in ("full", "dense"):
        plan = plan_from_block_mask(cls, seq_len=S, block_q=bq, block_k=bk, rule=None, token_density=0.5)

    # the GPU's decisions on CPU tensors: tiles as on a GPU, TMA descriptors, no emulation
    if block_m:  # else launch_config's choice on a GPU
        os.environ["VIDATTN_TRITON_BLOCK_M"] = str(block_m)
    if block_n:
        os.environ["VIDATTN_TRITON_BLOCK_N"] = str(block_n)
    if warps:
        os.environ["VIDATTN_TRITON_WARPS"] = str(warps)
    L.interpreting = lambda: False
    L.fp8_support = lambda device, precision: (True, "")
    L._tma_ok = lambda device: True
    L._gluon_path = lambda *a, **kw: None
    seen = {}

    class _Kernel:
        def __getitem__(self, grid):
            def launch(**kwargs):
                seen.update(kwargs)
                raise _Captured

            return launch

    fn = L._sparse_flash_fwd
    L._sparse_flash_fwd = _Kernel()
    try:
        L.block_sparse_attention_triton(q, k, v, plan, precision=None if precision == "bf16" else precision)
    except _Captured:
        pass
    finally:
        L._sparse_flash_fwd = fn
    num_warps, num_stages = seen.pop("num_warps"), seen.pop("num_stages")
    import inspect

    constexpr_names = {n for n, prm in inspect.signature(fn.fn).parameters.items() if "constexpr" in str(prm.annotation)}
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    sig, consts, div16 = {}, {}, []
    for i, name in enumerate(fn.arg_names):
        val = seen[name]
        if name in constexpr_names:
            consts[name] = val if isinstance(val, (bool, int, float)) else int(val)
            sig[name] = "constexpr"
            continue
        # the JIT's own specialisation: ints equal to 1 become constants, 16-divisible ints and
        # 16-byte aligned pointers get tt.divisibility (vector loads, cheaper addresses)
        kind, attr = native_specialize_impl(BaseBackend, val, False, True, True)
        if kind == "constexpr":
            consts[name], sig[name] = attr, "constexpr"
            continue
        sig[name] = kind
        if attr == "D":
            div16.append(i)
    consts["EMU_CAST"] = False
    consts["FP32_DOT"] = False
    return dict(signature=sig, constexprs=consts, div16=div16, num_warps=num_warps, num_stages=num_stages)


def build(captured: dict) -> dict:
    """``triton.compile`` for cuda:90 and ``ptxas -v`` (runs with ``TRITON_INTERPRET=0``).

    Returns ``dict(regs=int, stack_frame=int, loop_row_converts=int, wgmma=[str], spill_stores=int,
    spill_loads=int, ptx_lines=int)`` (bytes;
    the stack frame is what the driver reports as local memory, Triton's ``n_spills`` x 4).
    """
    import triton
    from triton.backends.compiler import GPUTarget

    from vidattn.kernels.sparse_flash_kernel import _sparse_flash_fwd

    attrs = {(i,): [["tt.divisibility", 16]] for i in captured.get("div16", [])}
    src = triton.compiler.ASTSource(_sparse_flash_fwd, captured["signature"], captured["constexprs"], attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": captured["num_warps"], "num_stages": captured["num_stages"]})
    ptx = c.asm["ptx"]
    loop_row_converts = _row_converts_in_loops(c.asm["ttgir"])
    dump = captured.get("dump")
    if dump:
        os.makedirs(dump, exist_ok=True)
        for kind in ("ttir", "ttgir", "llir", "ptx"):
            with open(os.path.join(dump, f"kernel.{kind}"), "w") as f:
                f.write(c.asm[kind])
    usage = ptxas_usage(ptx)
    mmas = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m64n\d+k\d+\.\w+\.\w+\.\w+)", ptx)))
    return dict(usage, loop_row_converts=loop_row_converts, wgmma=mmas, shfl_idx=ptx.count("shfl.sync.idx"),
                ptx_lines=ptx.count("\n"))


def sm90_tool(name: str) -> str:
    """Path of one of the CUDA tools Triton ships (``ptxas``, ``nvdisasm``)."""
    from triton.backends.nvidia import compiler

    return os.path.join(os.path.dirname(compiler.__file__), "bin", name)


def ptxas_usage(ptx: str, cubin_path: str = "") -> dict:
    """``ptxas -v`` of PTX text for sm_90a, as Triton runs it: ``dict(regs, stack_frame,
    spill_stores, spill_loads)`` (ints or None; bytes). ``cubin_path``: where to keep the cubin
    (else a temporary file)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        run = subprocess.run([sm90_tool("ptxas"), "-lineinfo", "-v", "--gpu-name=sm_90a", src, "-o",
                              cubin_path or os.path.join(d, "k.cubin")], capture_output=True, text=True)
    info = run.stderr + run.stdout
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    frame = re.search(r"(\d+) bytes stack frame", info)
    return dict(regs=int(regs.group(1)) if regs else None, stack_frame=int(frame.group(1)) if frame else None,
                spill_stores=int(spills.group(1)) if spills else None,
                spill_loads=int(spills.group(2)) if spills else None)


def _row_converts_in_loops(ttgir: str) -> int:
    """Layout conversions of row vectors (1-D fp32 tensors) inside ``scf.for`` bodies of a TTGIR
    listing: each is a shared-memory round trip and a barrier in every key tile."""
    n, loops = 0, []
    for line in ttgir.splitlines():
        indent = len(line) - len(line.lstrip())
        while loops and indent <= loops[-1] and not line.lstrip().startswith("scf.yield"):
            loops.pop()
        if "scf.for" in line:
            loops.append(indent)
        elif loops and "ttg.convert_layout" in line and re.search(r": tensor<\d+xf32", line):
            n += 1
    return n


def _run(step: str, payload: dict, interpret: str) -> dict:
    env = dict(os.environ, TRITON_INTERPRET=interpret, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, __file__, "--step", step, json.dumps(payload)], env=env,
                         capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def build_case(precision: str, block_m: int, block_n: int, head_dim: int = 128, rule: str = "full",
               warps: int = 0, seq_len: int = 1000, dump: str = "") -> dict:
    """Capture then build one case in fresh processes; returns build()'s dict plus the launch
    settings (``num_warps``, ``num_stages``, ``block_m``, ``block_n``); ``dump``: a folder for the TTIR / TTGIR / LLIR / PTX. Raises RuntimeError with the compiler's message."""
    cap = _run("capture", dict(precision=precision, block_m=block_m, block_n=block_n, head_dim=head_dim, rule=rule,
                               warps=warps, seq_len=seq_len), "1")
    out = _run("build", dict(cap, dump=dump), "0")
    out.update(num_warps=cap["num_warps"], num_stages=cap["num_stages"], block_m=cap["constexprs"]["BLOCK_M"],
               block_n=cap["constexprs"]["BLOCK_N"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precisions", default="bf16,fp8,int8,int8_fp8")
    p.add_argument("--tiles", default="0x0", help="BLOCK_MxBLOCK_N list (0x0: launch_config's choice)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rule", choices=("full", "dense", "na", "gna"), default="full",
                   help="random full blocks, a dense plan, or the neighborhood (9, 15, 27) window plain / strided (3, 5, 9)")
    p.add_argument("--warps", type=int, default=0, help="0: launch_config's choice")
    p.add_argument("--seq-len", type=int, default=1000, help="tokens (not a multiple of 128: a ragged last block)")
    p.add_argument("--dump", default="", help="write each case's TTIR / TTGIR / LLIR / PTX under this folder")
    p.add_argument("--step", default="", help=argparse.SUPPRESS)
    p.add_argument("payload", nargs="?", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.step == "capture":
        print(json.dumps(capture(**json.loads(a.payload))))
        return
    if a.step == "build":
        print(json.dumps(build(json.loads(a.payload))))
        return
    for prec in a.precisions.split(","):
        for tile in a.tiles.split(","):
            bm, bn = (int(x) for x in tile.split("x"))
            try:
                dump = os.path.join(a.dump, f"{prec}_{tile}") if a.dump else ""
                r = build_case(prec, bm, bn, a.head_dim, a.rule, a.warps, a.seq_len, dump)
            except RuntimeError as e:
                lines = [ln for ln in str(e).splitlines() if "Error" in ln] or str(e).strip().splitlines()
                r = dict(error=lines[-1][:300])
            print(json.dumps(dict(precision=prec, tile=tile, head_dim=a.head_dim, **r)), flush=True)


if __name__ == "__main__":
    main()
