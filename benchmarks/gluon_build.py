"""Build the Hopper Gluon kernel for sm_90a on a machine without a GPU and report what ptxas and
nvdisasm (both ship with Triton) say about it: stack frame, spills, cross-thread shuffles and the
instruction mix of the SASS.

Usage::

    python benchmarks/gluon_build.py --precisions bf16,int8,fp8,int8_fp8 --modes bench

``--modes bench`` compiles the modes of the benchmark shapes (full blocks, a ragged last key
block, no token permutation, no LSE); ``all`` turns every mode on (partial blocks, permutation,
LSE), as the build test does. The build runs in a fresh process with ``TRITON_INTERPRET=0``
(Gluon kernels do not build under the interpreter). Timing needs the GPU.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_INTS = ("qperm_h S H HK_GROUP ROW_B ROW_H COL_H VROW_B VROW_H VCOL_H NQT NUM_TILES NQB NKB stride_qb stride_qh "
         "stride_qs stride_ob stride_oh stride_os fn_b fn_h fi_b fi_h fi_q pn_b pn_h pi_b pi_h pi_q slot_b slot_h "
         "qs_b qs_h ks_b ks_h vs_b vs_h").split()


def _compile(cfg: dict) -> dict:
    """``triton.compile`` of the kernel for cuda:90 in this process (``TRITON_INTERPRET=0``);
    returns ``dict(ptx=str, num_warps=int, cubin=hex str)``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    from vidattn.kernels.sparse_flash_gluon import _gluon_sparse_flash_fwd

    prec = cfg["precision"]
    qk8, qk_int8, pv8 = prec != "bf16", prec in ("int8", "int8_fp8"), prec in ("fp8", "int8_fp8")
    qk_t, qk_gl = ("i8", gl.int8) if qk_int8 else ("fp8e4nv", gl.float8e4nv) if qk8 else ("bf16", gl.bfloat16)
    v_t, v_gl = ("fp8e4nv", gl.float8e4nv) if pv8 else ("bf16", gl.bfloat16)
    desc_k = f"tensordesc<{qk_t}[128, 128],{gl.NVMMASharedLayout.get_default_for([128, 128], qk_gl)!r}>"
    desc_v = f"tensordesc<{v_t}[128, 128],{gl.NVMMASharedLayout.get_default_for([128, 128], v_gl)!r}>"
    q_quant = qk8 and cfg.get("q_quant", True)  # the kernel quantises a bf16 Q itself
    sig = dict(desc_k=desc_k, desc_v=desc_v, Q="*" + ("bf16" if q_quant else qk_t), O="*bf16", LSE="*fp32", FULL_NUM="*i32", FULL_IDX="*i32",
               QPERM="*i32", PART_NUM="*i32", PART_IDX="*i32", BITS="*u8", SLOT="*i64", QSC="*fp32", KSC="*fp32",
               VSC="*fp32", qk_scale="fp32", **{n: "i32" for n in _INTS})
    every = cfg["modes"] == "all"
    const = dict(RAGGED=cfg.get("ragged", True), Q_PERM=every, RETURN_LSE=every, STAGES=cfg["stages"], SPLIT=cfg["split"],
                 PINGPONG=not cfg["split"] and cfg.get("pingpong", every), HAS_PARTIAL=every, BLOCK_N=128, BLOCK_D=128, QK8=qk8, QK_INT8=qk_int8,
                 PV8=pv8, PV_SPLIT_ACC=cfg["split_acc"], I2F_BITS=cfg["i2f_bits"], Q_QUANT=q_quant,
                 EXP_POLY=cfg.get("exp_poly", False) and not every,
                 RESCALE_TAU=(1.0 if pv8 else 8.0) if cfg.get("lazy", False) else -1.0,
                 ROWSUM_MMA=cfg.get("rowsum", False), Q_PREFETCH=cfg.get("q_prefetch", False), CONSUMER_REGS=240,
                 PRODUCER_REGS=24)
    sig.update({n: "constexpr" for n in const})
    c = triton.compile(GluonASTSource(_gluon_sparse_flash_fwd, sig, const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})
    return dict(ptx=c.asm["ptx"], num_warps=c.metadata.num_warps, cubin=c.asm.get("cubin", b"").hex())


def _analyse(ptx: str, cubin: bytes) -> dict:
    """ptxas -v on the PTX (:func:`portable_build.ptxas_usage`) and nvdisasm's SASS of the cubin:
    stack frame / spill bytes, the cross-thread shuffles of the PTX and the SASS opcode counts
    (static)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from portable_build import ptxas_usage, sm90_tool

    out = {"shfl_idx": ptx.count("shfl.sync.idx"), "shfl_bfly": ptx.count("shfl.sync.bfly")}
    usage = ptxas_usage(ptx)
    out.update(stack_frame=usage["stack_frame"], spill_stores=usage["spill_stores"])
    with tempfile.TemporaryDirectory() as d:
        obj = os.path.join(d, "k.cubin")
        with open(obj, "wb") as f:
            f.write(cubin)
        sass = subprocess.run([sm90_tool("nvdisasm"), "-c", obj], capture_output=True, text=True).stdout
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T] )?([A-Z0-9]+)", sass, flags=re.M)
    out["sass"] = dict(collections.Counter(ops).most_common())
    out["key_loop"] = key_loop(sass)
    return out


def key_loop(sass: str) -> dict:
    """The steady key loop in nvdisasm's SASS text: the shortest backward branch's body that holds
    at least two warpgroup MMAs (``HGMMA`` / ``QGMMA`` / ``IGMMA``: S of one tile and P.V of the
    previous). Returns ``dict(instructions=int, ops={opcode: count})`` (empty when none is found)."""
    labels, body = {}, []  # label -> index of the next instruction; (opcode, branch target or None)
    for line in sass.splitlines():
        lab = re.match(r"^\s*(\.L_x_\d+):", line)
        if lab:
            labels[lab.group(1)] = len(body)
            continue
        ins = re.match(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T] )?([A-Z0-9]+)(?:\.[A-Z0-9_.]+)*\s*([^;]*)", line)
        if ins:
            tgt = re.search(r"\((\.L_x_\d+)\)", ins.group(2)) if ins.group(1) == "BRA" else None
            body.append((ins.group(1), tgt.group(1) if tgt else None))
    best = None
    for end, (op, tgt) in enumerate(body):
        start = labels.get(tgt) if tgt else None
        if start is None or start > end:
            continue
        ops = [o for o, _ in body[start:end + 1]]
        if sum(o.endswith("GMMA") for o in ops) >= 2 and (best is None or len(ops) < len(best)):
            best = ops
    if best is None:
        return {}
    return dict(instructions=len(best), ops=dict(collections.Counter(best).most_common()))


def build(precision: str, split: bool = False, i2f_bits: bool = False, modes: str = "all",
          split_acc: bool = False, stages: int = 2, q_quant: bool = True, exp_poly: bool = False,
          ragged: bool = True, lazy: bool = False, pingpong: Optional[bool] = None, rowsum: bool = False,
          q_prefetch: bool = False) -> dict:
    """Compile in a fresh process, then analyse. ``precision``: ``"bf16"``, ``"int8"``, ``"fp8"``
    or ``"int8_fp8"``; ``q_quant``: 8-bit precisions quantise a bf16 Q in the kernel (else Q
    arrives 8-bit); ``exp_poly``: half the exponentials by polynomial (``modes="bench"`` only);
    ``ragged``: a ragged last key block (its masking branch in the key loop); ``lazy``: the lazy
    rescale (``VIDATTN_GLUON_LAZY_RESCALE=1``); ``pingpong``: the PINGPONG mode (default: on with
    ``modes="all"``, off with ``"bench"``, as the launcher runs it by default); ``rowsum``: the softmax row
    sums by an MMA (``VIDATTN_GLUON_ROWSUM_MMA``); ``q_prefetch``: the next work item's Q loaded under
    this one's tail (``VIDATTN_GLUON_Q_PREFETCH``, persistent grid). Returns ``dict(ptx, num_warps, cubin_bytes, stack_frame, spill_stores,
    shfl_idx, shfl_bfly, sass={opcode: count}, key_loop=:func:`key_loop`)``; RuntimeError with the compiler's message."""
    if modes not in ("all", "bench"):
        raise ValueError(f"modes must be 'all' or 'bench', got {modes!r}")
    cfg = dict(precision=precision, split=split, i2f_bits=i2f_bits, modes=modes, split_acc=split_acc, stages=stages,
               q_quant=q_quant, exp_poly=exp_poly, ragged=ragged, lazy=lazy, rowsum=rowsum, q_prefetch=q_prefetch)
    if pingpong is not None:
        cfg["pingpong"] = pingpong
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, __file__, "--step", json.dumps(cfg)], env=env, capture_output=True, text=True,
                         timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"the Gluon kernel did not build:\n{run.stderr[-4000:]}")
    built = json.loads(run.stdout.strip().splitlines()[-1])
    cubin = bytes.fromhex(built.pop("cubin"))
    built["cubin_bytes"] = len(cubin)
    if cubin:
        built.update(_analyse(built["ptx"], cubin))
    return built


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--precisions", default="bf16,int8,fp8,int8_fp8")
    p.add_argument("--modes", choices=("all", "bench"), default="bench")
    p.add_argument("--split", action="store_true", help="64-token query blocks (one list per warpgroup)")
    p.add_argument("--split-acc", action="store_true",
                   help="8-bit P.V of each tile added in fp32 registers (default: accumulated in the MMA across tiles)")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--q8-input", action="store_true", help="8-bit precisions: Q arrives quantised (no Q_QUANT)")
    p.add_argument("--exp-poly", action="store_true", help="half the softmax exponentials by polynomial")
    p.add_argument("--i2f-bits", action="store_true", help="int8: int32 logits to fp32 by bit arithmetic")
    p.add_argument("--lazy", action="store_true", help="lazy rescale of the output accumulator")
    p.add_argument("--no-ragged", action="store_true", help="no ragged last key block")
    p.add_argument("--pingpong", action="store_true", help="the PINGPONG mode (off by default, as launched)")
    p.add_argument("--rowsum-mma", action="store_true", help="the softmax row sums by a P x ones MMA")
    p.add_argument("--q-prefetch", action="store_true", help="the next work item's Q loaded under this one's tail")
    p.add_argument("--top", type=int, default=12, help="SASS opcodes to print")
    p.add_argument("--step", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.step:
        print(json.dumps(_compile(json.loads(a.step))))
        return
    for prec in a.precisions.split(","):
        try:
            r = build(prec, split=a.split, modes=a.modes, split_acc=a.split_acc, stages=a.stages,
                      q_quant=not a.q8_input, exp_poly=a.exp_poly, i2f_bits=a.i2f_bits, lazy=a.lazy,
                      ragged=not a.no_ragged, pingpong=a.pingpong or None, rowsum=a.rowsum_mma,
                      q_prefetch=a.q_prefetch)
        except RuntimeError as e:
            print(json.dumps(dict(precision=prec, error=str(e).strip().splitlines()[-1][:300])))
            continue
        r.pop("ptx")
        r["sass"] = dict(list(r["sass"].items())[: a.top])
        if r.get("key_loop"):
            r["key_loop"]["ops"] = dict(list(r["key_loop"]["ops"].items())[: a.top])
        print(json.dumps(dict(precision=prec, modes=a.modes, **r)), flush=True)


if __name__ == "__main__":
    main()
