"""Attention-kernel benchmark: torch SDPA (cuDNN, flash), FlexAttention (compiled, same block
layout), xformers (if it loads) and vidattn's Triton kernel, on production video shapes.

    python benchmarks/attention.py [--json out.json] [--quick]
    python benchmarks/attention.py --backward [--json out.json]   # forward+backward, peak memory
    python benchmarks/attention.py --peers [--json out.json]      # FA4 / flex FLASH / SageAttention
    python benchmarks/attention.py --precision fp8[,int8,int8_fp8|all] [--json out.json]  # quantised vs bf16 / Sage
    vidattn bench attention [...]

Effective TFLOP/s = 4 * B * H * D * (computed key blocks * block tokens per query block) / time,
i.e. FLOPs of the blocks a kernel computes. Needs a CUDA GPU. A correctness check against the
reference backend runs first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from vidattn.kernels.quant_fp8 import PRECISIONS

SHAPES = {
    # name: (B, heads, grid, text tokens appended after the video, D)
    "wan1.3b-480p-81f": (1, 12, (21, 30, 52), 0, 128),
    "hunyuan-720p-129f": (1, 24, (33, 45, 80), 256, 128),
}


DEVICE = "cuda"  # the benchmark's device (the CPU smoke test of --precision sets "cpu" under the interpreter)


def _bench(fn):
    import triton

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def _random_block_plan(S, heads, density, block, seed=0):
    from vidattn.plan import FULL, plan_from_block_mask

    nb = math.ceil(S / block)
    kcnt = max(1, int(round(density * nb)))
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    idx = torch.argsort(torch.rand(1, heads, nb, nb, device=DEVICE, generator=g), dim=-1)[..., :kcnt]
    cls = torch.zeros(1, heads, nb, nb, dtype=torch.int8, device=DEVICE)
    cls.scatter_(-1, idx, FULL)
    return plan_from_block_mask(cls, seq_len=S, block_q=block, block_k=block, rule=None, token_density=kcnt / nb,
                                meta=dict(pattern=f"random-{density}"))


def correctness(log):
    """Triton vs reference on small CUDA cases (bf16 + fp32, neighborhood, generic rule, GQA)."""
    import vidattn
    from vidattn.kernels.reference import block_sparse_attention_reference as ref_fn
    from vidattn.kernels.sparse_flash import block_sparse_attention_triton as tri_fn

    cases = [
        (vidattn.TokenLayout((6, 10, 12), suffix=7), vidattn.Neighborhood(kernel_size=(3, 5, 5), dilation=(1, 2, 1))),
        (vidattn.TokenLayout((20, 24), prefix=3), vidattn.Neighborhood(kernel_size=(7, 9), stride=(2, 3),
                                                                        is_causal=(True, False))),
        (vidattn.TokenLayout((8, 16, 16)), vidattn.Dense()),
    ]
    try:
        cases.append((vidattn.TokenLayout((8, 16, 16), suffix=5), vidattn.Radial(block_size=64)))
    except Exception as e:
        log(dict(check="radial", skipped=str(e)))
    worst = 0.0
    for layout, pat in cases:
        for dt, D, (H, Hk) in ((torch.bfloat16, 128, (4, 4)), (torch.float32, 64, (4, 2)), (torch.float16, 96, (4, 1))):
            S = layout.seq_len
            q = torch.randn(2, S, H, D, device="cuda", dtype=dt)
            k = torch.randn(2, S, Hk, D, device="cuda", dtype=dt)
            v = torch.randn(2, S, Hk, D, device="cuda", dtype=dt)
            plan = pat.plan(layout, device="cuda", num_heads=H)
            out = tri_fn(q, k, v, plan)
            ref = ref_fn(q.float(), k.float(), v.float(), plan)
            rel = float((out.float() - ref).norm() / ref.norm())
            worst = max(worst, rel)
            log(dict(check=type(pat).__name__, grid=layout.grid, dtype=str(dt), D=D, heads=[H, Hk], rel_err=rel))
    return worst


def run(args, log):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import vidattn
    from vidattn.kernels.flex import _compiled_flex, block_mask_from_plan, flex_kernel_options
    from vidattn.kernels.sparse_flash import block_sparse_attention_triton as tri_fn

    flex = _compiled_flex()
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k.startswith("wan")}
    for label, (B, H, grid, text, D) in shapes.items():
        layout = vidattn.TokenLayout(grid, suffix=text)
        S = layout.seq_len
        q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        dense_flops = 4 * B * H * S * S * D

        def rec(name, ms, flops, **extra):
            r = dict(shape=label, name=name, ms=round(ms, 3), tflops=round(flops / (ms * 1e-3) / 1e12, 1), **extra)
            log(r)
            return r

        base = {}
        for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            try:
                with sdpa_kernel([be]):
                    base[be.name] = rec(f"sdpa-{be.name}", _bench(
                        lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh)), dense_flops)["ms"]
            except Exception as e:
                log(dict(shape=label, name=f"sdpa-{be.name}", skipped=repr(e)[:200]))
        try:
            import xformers.ops as xops

            rec("xformers-mea", _bench(lambda: xops.memory_efficient_attention(q, k, v)), dense_flops)
        except Exception as e:
            log(dict(shape=label, name="xformers-mea", skipped=repr(e)[:300]))
        cudnn = base.get("CUDNN_ATTENTION")

        def both(name, plan, note=None, flex_ok=True):
            """flex and triton on the same plan."""
            fl = plan.block_density * dense_flops
            try:
                if not flex_ok:
                    raise RuntimeError("skipped: flex compile of this mask_mod runs out of memory at this size")
                bm = block_mask_from_plan(plan, H)
                qp, kp, vp = qh, kh, vh
                if plan.perm is not None:
                    from vidattn.kernels.reference import to_plan_order
                    qp, kp, vp = (to_plan_order(t, plan.perm).contiguous() for t in (qh, kh, vh))
                f_ms = _bench(lambda: flex(qp, kp, vp, block_mask=bm, kernel_options=flex_kernel_options(plan)))
                rec(f"flex-{name}", f_ms, fl, block_density=round(plan.block_density, 4))
            except Exception as e:
                f_ms = None
                log(dict(shape=label, name=f"flex-{name}", skipped=repr(e)[:300]))
            from vidattn.kernels.sparse_flash_launch import last_launch

            t_ms = _bench(lambda: tri_fn(q, k, v, plan))
            path = last_launch.get("path")
            rec(f"triton-{name}", t_ms, fl, block_density=round(plan.block_density, 4),
                token_density=round(plan.token_density, 4), path=path,
                vs_flex=round(f_ms / t_ms, 3) if f_ms else None,
                vs_cudnn_dense=round(cudnn / t_ms, 3) if cudnn else None,
                target_ms=round(1.3 * plan.token_density * cudnn, 3) if cudnn and note == "na" else None)
            if path == "gluon-hopper":  # the portable kernel on the same plan, same run
                with _env(VIDATTN_GLUON="0"):
                    p_ms = _bench(lambda: tri_fn(q, k, v, plan))
                rec(f"triton-portable-{name}", p_ms, fl, path="portable", gluon_speedup=round(p_ms / t_ms, 3))

        rec("flex-dense", _bench(lambda: flex(qh, kh, vh)), dense_flops)
        both("dense", vidattn.Dense().plan(layout, device="cuda"))
        for dens in (0.5, 0.25, 0.125, 0.0625):
            both(f"blocksparse-d{dens}", _random_block_plan(S, H, dens, 128))
        if label.startswith("wan"):
            for kern in ((9, 15, 27),):
                for tile in (None, (2, 8, 8)):
                    pat = vidattn.Neighborhood(kernel_size=kern, tile_shape=tile)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    plan = pat.plan(layout, device="cuda")
                    torch.cuda.synchronize()
                    build = time.perf_counter() - t0
                    log(dict(shape=label, name=f"plan-neighborhood{kern}-tile{tile}", build_s=round(build, 3),
                             token_density=round(plan.token_density, 4), block_density=round(plan.block_density, 4)))
                    both(f"neighborhood{kern}-tile{tile or 'auto'}", plan, note="na")
        radials = [("radial-token", dict()), ("radial-block", dict(granularity="block"))]
        for rname, kw in radials:
          try:
            pat = vidattn.Radial(**kw)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            plan = pat.plan(layout, device="cuda")
            torch.cuda.synchronize()
            log(dict(shape=label, name=f"plan-{rname}", build_s=round(time.perf_counter() - t0, 3),
                     token_density=round(plan.token_density, 4), block_density=round(plan.block_density, 4)))
            both(rname, plan, flex_ok=not label.startswith("hunyuan") or "block" in rname)
          except Exception as e:
            log(dict(shape=label, name=rname, skipped=repr(e)[:300]))
        del q, k, v, qh, kh, vh
        torch.cuda.empty_cache()


BWD_DENSITIES = (0.5, 0.25, 0.125, 0.0625)


def _bench_mem(fn):
    """(median ms, peak allocated MiB above the start) of ``fn``."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return _bench(fn), round(peak, 1)


def run_backward(args, log):
    """Forward+backward time and peak memory at the Wan-1.3B shape: SDPA cuDNN / flash (dense),
    FlexAttention (compiled, same block layout) and vidattn's Triton forward + block-sparse
    backward on the same plans (random block-sparse at densities 0.0625-0.5, dense, a 3-D
    neighborhood). Effective TFLOP/s counts 2.5x the forward FLOPs of the computed blocks
    (FA2 convention: backward = 2.5 forward matmuls)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import vidattn
    from vidattn.kernels.flex import _compiled_flex, block_mask_from_plan, flex_kernel_options
    from vidattn.kernels.sparse_flash_autograd import block_sparse_attention_triton_autograd as tri_fn
    from vidattn.plan_order import to_plan_order

    flex = _compiled_flex()
    B, H, grid, text, D = SHAPES["wan1.3b-480p-81f"]
    label = "wan1.3b-480p-81f"
    layout = vidattn.TokenLayout(grid, suffix=text)
    S = layout.seq_len
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16)
    dense_fb = 3.5 * 4 * B * H * S * S * D  # forward + backward FLOPs of dense attention

    def fb(fwd, inputs, grad):
        def step():
            out = fwd()
            torch.autograd.grad(out, inputs, grad)
        return step

    def rec(name, ms, mem, flops, **extra):
        r = dict(shape=label, mode="fwd+bwd", name=name, ms=round(ms, 3), peak_mib=mem,
                 tflops=round(flops / (ms * 1e-3) / 1e12, 1), **extra)
        log(r)
        return r

    qh, kh, vh = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))
    doh = dout.transpose(1, 2).contiguous()
    base = {}
    for be in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        try:
            with sdpa_kernel([be]):
                ms, mem = _bench_mem(fb(lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh),
                                        (qh, kh, vh), doh))
            base[be.name] = rec(f"sdpa-{be.name}", ms, mem, dense_fb)["ms"]
        except Exception as e:
            log(dict(shape=label, mode="fwd+bwd", name=f"sdpa-{be.name}", skipped=repr(e)[:200]))
    cudnn = base.get("CUDNN_ATTENTION")

    def both(name, plan):
        fl = plan.block_density * dense_fb
        f_ms = None
        try:
            bm = block_mask_from_plan(plan, H)
            if plan.perm is not None:
                qp, kp, vp = (to_plan_order(t.detach(), plan.perm).contiguous().requires_grad_(True) for t in (qh, kh, vh))
            else:
                qp, kp, vp = qh, kh, vh
            f_ms, f_mem = _bench_mem(fb(lambda: flex(qp, kp, vp, block_mask=bm, kernel_options=flex_kernel_options(plan)),
                                        (qp, kp, vp), doh))
            rec(f"flex-{name}", f_ms, f_mem, fl, block_density=round(plan.block_density, 4))
        except Exception as e:
            log(dict(shape=label, mode="fwd+bwd", name=f"flex-{name}", skipped=repr(e)[:300]))
        t_ms, t_mem = _bench_mem(fb(lambda: tri_fn(q, k, v, plan), (q, k, v), dout))
        rec(f"triton-{name}", t_ms, t_mem, fl, block_density=round(plan.block_density, 4),
            vs_flex=round(f_ms / t_ms, 3) if f_ms else None, vs_cudnn_dense=round(cudnn / t_ms, 3) if cudnn else None)

    if not args.skip_check:  # gradients vs the reference on a small case first
        lay = vidattn.TokenLayout((4, 12, 16), suffix=5)
        plan = vidattn.Neighborhood(kernel_size=(3, 5, 7)).plan(lay, device="cuda")
        xs = [torch.randn(1, lay.seq_len, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        g = torch.randn_like(xs[0])
        got = torch.autograd.grad(tri_fn(*xs, plan), xs, g)
        ref = torch.autograd.grad(vidattn.run_plan(*xs, plan, backend="reference"), xs, g)
        log(dict(check="backward_rel_err", value=[round(float((a.float() - b.float()).norm() / b.float().norm()), 5)
                                                  for a, b in zip(got, ref)]))
    both("dense", vidattn.Dense().plan(layout, device="cuda"))
    for dens in BWD_DENSITIES:
        both(f"blocksparse-d{dens}", _random_block_plan(S, H, dens, 128))
    both("neighborhood(9,15,27)", vidattn.Neighborhood(kernel_size=(9, 15, 27)).plan(layout, device="cuda"))


def _fa4_block_sparse(plan, head_dim):
    """FlashAttention-4 ``BlockSparseTensorsTorch`` for ``plan`` (q/k/v ``[B, S, H, head_dim]``).

    Counts int32 ``[Bp, Hp, NQB]``, indices int32 ``[Bp, Hp, NQB, W]`` and ``block_size=(block_q,
    block_k)`` (vidattn.bench.fa4_layout). Raises RuntimeError with the reason when FA4's forward
    on this GPU cannot run the plan as given (block size vs its tile, token order, partial blocks).
    """
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    from vidattn.bench.fa4_layout import fa4_unsupported_reason, plan_to_fa4_block_sparse

    major, minor = torch.cuda.get_device_capability()
    why = fa4_unsupported_reason(plan, head_dim, arch=10 * major + minor)
    if why is not None:
        raise RuntimeError(why)
    t = plan_to_fa4_block_sparse(plan)
    return BlockSparseTensorsTorch(mask_block_cnt=t.mask_block_cnt, mask_block_idx=t.mask_block_idx,
                                   full_block_cnt=t.full_block_cnt, full_block_idx=t.full_block_idx,
                                   block_size=t.block_size)


def _fa4_version():
    try:
        from importlib.metadata import version

        return dict(flash_attn_4=version("flash-attn-4"), cutlass_dsl=version("nvidia-cutlass-dsl"))
    except Exception as e:  # installed with --target: metadata still found through sys.path
        return dict(version_error=repr(e)[:120])


def run_peers(args, log):
    """Peers side by side on the same block layouts (Wan shape, bf16, forward): cuDNN SDPA,
    FlexAttention (Triton), FlexAttention ``BACKEND="FLASH"``, FlashAttention-4 block-sparse
    (``flash_attn.cute.flash_attn_func(..., block_sparse_tensors=...)``), SageAttention (dense) and
    vidattn's Triton kernel. A peer that does not load is skipped with the reason. FA4 on the lent
    H200: flash-attn-4 4.0.0b19 + nvidia-cutlass-dsl 4.5.3, installed by
    ``benchmarks/fa4_device_setup.sh`` (its printed PYTHONPATH must be set); its rows carry
    ``vs_triton`` (rel_l2/cos of FA4's output against vidattn's kernel on the same plan)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import vidattn
    from vidattn.kernels.flex import _compiled_flex, block_mask_from_plan, flex_kernel_options
    from vidattn.kernels.sparse_flash import block_sparse_attention_triton as tri_fn

    flex = _compiled_flex()
    B, H, grid, text, D = SHAPES["wan1.3b-480p-81f"]
    label = "wan1.3b-480p-81f"
    S = vidattn.TokenLayout(grid, suffix=text).seq_len
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    dense = 4 * B * H * S * S * D

    def rec(name, fn, flops, **extra):
        try:
            ms = _bench(fn)
            r = dict(shape=label, mode="peers", name=name, ms=round(ms, 3), tflops=round(flops / (ms * 1e-3) / 1e12, 1),
                     **extra)
        except Exception as e:
            r = dict(shape=label, mode="peers", name=name, skipped=repr(e)[:300], **extra)
        log(r)
        return r

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        rec("sdpa-cudnn-dense", lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh), dense)
    try:
        from sageattention import sageattn

        rec("sageattention-dense", lambda: sageattn(qh, kh, vh, tensor_layout="HND"), dense)
    except Exception as e:
        log(dict(shape=label, mode="peers", name="sageattention-dense", skipped=f"does not load: {e!r}"[:300]))
    try:
        from flash_attn.cute import flash_attn_func as fa4
        fa4_err = None
    except Exception as e:
        fa4, fa4_err = None, f"flash_attn.cute (flash-attn-4) does not load: {e!r}"[:300]
    if fa4 is None:
        log(dict(shape=label, mode="peers", name="fa4-dense", skipped=fa4_err))
    else:  # FA4's dense kernel on the same inputs: the ceiling its block-sparse rows compare to
        rec("fa4-dense", lambda: fa4(q, k, v), dense, **_fa4_version())
    for dens in (1.0, 0.5, 0.25, 0.125, 0.0625):
        plan = vidattn.Dense().plan(vidattn.TokenLayout(grid), device="cuda") if dens == 1.0 else \
            _random_block_plan(S, H, dens, 128)
        fl = plan.block_density * dense
        extra = dict(block_density=round(plan.block_density, 4))
        bm = block_mask_from_plan(plan, H)
        rec(f"flex-triton-d{dens}", lambda: flex(qh, kh, vh, block_mask=bm, kernel_options=flex_kernel_options(plan)),
            fl, **extra)
        rec(f"flex-FLASH-d{dens}", lambda: flex(qh, kh, vh, block_mask=bm, kernel_options={"BACKEND": "FLASH"}), fl,
            **extra)
        if fa4 is None:
            log(dict(shape=label, mode="peers", name=f"fa4-blocksparse-d{dens}", skipped=fa4_err, **extra))
        else:
            try:  # first call compiles (CuTe DSL JIT); output checked against vidattn's kernel
                bst = _fa4_block_sparse(plan, D)
                out = fa4(q, k, v, block_sparse_tensors=bst)
                out = out[0] if isinstance(out, tuple) else out
                chk = _err(out, tri_fn(q, k, v, plan))
                rec(f"fa4-blocksparse-d{dens}", lambda: fa4(q, k, v, block_sparse_tensors=bst), fl,
                    vs_triton=chk, **_fa4_version(), **extra)
            except Exception as e:
                log(dict(shape=label, mode="peers", name=f"fa4-blocksparse-d{dens}", skipped=repr(e)[:300], **extra))
        rec(f"triton-d{dens}", lambda: tri_fn(q, k, v, plan), fl, **extra)


FP8_DENSITIES = (1.0, 0.5, 0.25, 0.125, 0.0625)  # 1.0: the dense plan


class _env:
    """Set environment variables for a block (None: unset), restoring them after."""

    def __init__(self, **kv):
        self.kv, self.old = kv, {}

    def __enter__(self):
        for k, v in self.kv.items():
            self.old[k] = os.environ.get(k)
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _err(out, ref):
    """(relative L2, cosine) of ``out`` against ``ref`` (same shape), computed in float64 chunks."""
    o, r = out.reshape(-1), ref.reshape(-1)
    num = den = dot = oo = 0.0
    for i in range(0, o.numel(), 1 << 26):
        a, b = o[i:i + (1 << 26)].double(), r[i:i + (1 << 26)].double()
        num += float(((a - b) ** 2).sum())
        den += float((b * b).sum())
        dot += float((a * b).sum())
        oo += float((a * a).sum())
    return dict(rel_l2=round(math.sqrt(num / den), 5), cos=round(dot / math.sqrt(den * oo), 6))


QUANT_PRECISIONS = tuple(p for p in PRECISIONS if p is not None)  # the kernel's quantised precisions


def quant_check(log, precisions=("fp8",)):
    """Each quantised precision of the kernel vs the float64 reference backend on small cases (every
    plan kind); returns the worst relative L2 per precision."""
    import vidattn
    from vidattn.kernels.reference import block_sparse_attention_reference as ref_fn
    from vidattn.kernels.sparse_flash import block_sparse_attention_triton as tri_fn

    cases = [
        (vidattn.TokenLayout((6, 10, 12), suffix=7), vidattn.Neighborhood(kernel_size=(3, 5, 5), dilation=(1, 2, 1))),
        (vidattn.TokenLayout((8, 16, 16)), vidattn.Neighborhood(kernel_size=(3, 7, 7), tile_shape=(2, 8, 8))),
        (vidattn.TokenLayout((8, 16, 16), suffix=5), vidattn.Dense()),
    ]
    worst = {p: 0.0 for p in precisions}
    for layout, pat in cases:
        for D, (H, Hk) in ((128, (4, 4)), (64, (4, 2))):
            S = layout.seq_len
            q, k, v = (torch.randn(2, S, h, D, device=DEVICE, dtype=torch.bfloat16) for h in (H, Hk, Hk))
            k = k + 2 * torch.randn(D, device=DEVICE, dtype=torch.bfloat16)  # a channel offset (smoothing)
            plan = pat.plan(layout, device=DEVICE, num_heads=H)
            ref = ref_fn(q.double(), k.double(), v.double(), plan)
            for prec in precisions:
                try:
                    out = tri_fn(q, k, v, plan, precision=prec)
                except Exception as e:  # noqa: BLE001 - a case that does not run is a skip with its reason
                    log(dict(check=f"{prec}-{type(pat).__name__}", D=D, skipped=repr(e)[:300]))
                    continue
                e = _err(out, ref)
                worst[prec] = max(worst[prec], e["rel_l2"])
                log(dict(check=f"{prec}-{type(pat).__name__}", grid=layout.grid, D=D, heads=[H, Hk], **e))
    return worst


FP8_VARIANTS = ((64, 4, 3), (128, 4, 2), (128, 8, 2), (128, 8, 3), (64, 8, 2))  # (BLOCK_N, warps, stages)


def _fp8_inputs(label):
    B, H, grid, text, D = SHAPES[label]
    import vidattn

    layout = vidattn.TokenLayout(grid, suffix=text)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (torch.randn(B, layout.seq_len, H, D, device=DEVICE, dtype=torch.bfloat16, generator=g)
               for _ in range(3))
    return layout, q, k, v


def _fp8_plans(layout, H):
    import vidattn

    for dens in FP8_DENSITIES:
        if dens == 1.0:
            yield "dense", vidattn.Dense().plan(layout, device=DEVICE)
        else:
            yield f"blocksparse-d{dens}", _random_block_plan(layout.seq_len, H, dens, 128)


def _dense_fp64(qh, kh, vh, budget_bytes=4 << 30):
    """Exact dense attention ``[B, H, S, D]`` in float64 (``qh, kh, vh`` ``[B, H, S, D]``, scale
    ``D ** -0.5``), in query chunks whose score matrix stays under ``budget_bytes``; returned in
    float32 (the comparisons' reference; its own error is far below what they measure)."""
    B, H, S, D = qh.shape
    k64, v64 = kh.double(), vh.double()
    rows = max(1, budget_bytes // (B * H * S * 8))
    out = torch.empty(B, H, S, D, dtype=torch.float32, device=qh.device)
    for i in range(0, S, rows):
        sc = (qh[:, :, i:i + rows].double() @ k64.transpose(-1, -2)) * D ** -0.5
        out[:, :, i:i + rows] = (sc.softmax(-1) @ v64).float()
        del sc
    return out


def run_quant(args, log):
    """``--precision fp8[,int8,int8_fp8]``: the quantised precisions of vidattn's Triton kernel
    (:mod:`vidattn.kernels.quant_fp8`; ``args.precisions``, default ``("fp8",)``) next to its bf16
    path and SageAttention, on the dense plan and random block-sparse plans (densities
    0.5-0.0625, 128-token blocks), Wan and HunyuanVideo shapes, bf16 inputs.

    Rows (``mode="fp8"``, the name kept for every precision), in this order: per shape
    ``sdpa-cudnn-dense``, ``sageattention-dense``, and per plan ``triton-bf16-*`` and for each
    precision ``triton-{precision}-*`` (the time includes the quantisation prologue;
    ``prologue_ms`` / ``prologue_torch_ms`` time the Triton / torch prologue alone) and
    ``accuracy-*``; then, on the Wan shape's dense and d0.25 plans, per precision launch variants
    (``-bn{BLOCK_N}-w{warps}-s{stages}``) and, last (a miscompile there cannot cost the other
    rows), Triton's automatic warp specialisation (``VIDATTN_WARP_SPECIALIZE=1``, with and without
    TMA: ``-ws-tma1`` / ``-ws-tma0``) for bf16 and each precision. Accuracy on the same inputs
    (``{"rel_l2", "cos"}`` each): on every plan ``{precision}_vs_bf16`` (vs the bf16 kernel); on
    the dense plan also ``{precision}_vs_fp64``, ``bf16_vs_fp64`` and ``sage_vs_fp64`` (vs exact
    float64 attention), ``sage_vs_bf16`` and ``{precision}_vs_sage``. Effective TFLOP/s =
    computed blocks' FLOPs (4 B H D x block tokens) / time, dense-equivalent on the dense plan."""
    from vidattn.kernels import quant_fp8
    from vidattn.kernels.sparse_flash import block_sparse_attention_triton as tri_fn
    from vidattn.kernels.sparse_flash import last_launch

    precs = tuple(getattr(args, "precisions", None) or ("fp8",))
    try:
        from sageattention import sageattn
        sage_err = None
    except Exception as e:  # noqa: BLE001 - any import failure is a skip reason
        sageattn, sage_err = None, f"sageattention does not load: {e!r}"[:300]
    for prec in precs:
        ok, why = quant_fp8.fp8_support(torch.device(DEVICE), prec)
        if not ok:
            log(dict(mode="fp8", precision=prec, skipped=why))
            return
    if not args.skip_check:
        worst = quant_check(log, precs)
        for prec in precs:
            log(dict(check=f"{prec}_worst_rel_err", value=worst[prec]))

    def rec(label, name, fn, flops, emit=True, **extra):
        try:
            ms = _bench(fn)
            r = dict(shape=label, mode="fp8", name=name, ms=round(ms, 3), tflops=round(flops / (ms * 1e-3) / 1e12, 1),
                     **extra)
            if name.startswith("triton"):
                r["regs_spills"] = last_launch.get("regs_spills")
                r["path"] = last_launch.get("path")
        except Exception as e:  # noqa: BLE001 - a row that does not run is a skip with its reason
            r = dict(shape=label, mode="fp8", name=name, skipped=repr(e)[:300], **extra)
        if emit:
            log(r)
        return r

    def quant_fn(q, k, v, plan, prec):
        return lambda: tri_fn(q, k, v, plan, precision=prec)

    shapes = [k for k in SHAPES if not args.quick or k.startswith("wan")]
    part = getattr(args, "fp8_part", "all")
    for label in shapes if part in ("all", "main") else ():
        layout, q, k, v = _fp8_inputs(label)
        B, S, H, D = q.shape
        qh, kh, vh = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        dense_flops = 4 * B * H * S * S * D
        ref = None  # accuracy reference on the dense plan: exact float64 attention
        try:
            ref = _dense_fp64(qh, kh, vh)
        except Exception as e:  # noqa: BLE001
            log(dict(shape=label, mode="fp8", name="fp64-reference", skipped=repr(e)[:300]))
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                rec(label, "sdpa-cudnn-dense", lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh),
                    dense_flops)
        except Exception as e:  # noqa: BLE001
            log(dict(shape=label, mode="fp8", name="sdpa-cudnn-dense", skipped=repr(e)[:300]))
        sage_out = None
        if sageattn is None:
            log(dict(shape=label, mode="fp8", name="sageattention-dense", skipped=sage_err))
        else:
            rec(label, "sageattention-dense", lambda: sageattn(qh, kh, vh, tensor_layout="HND", is_causal=False),
                dense_flops)
            try:
                sage_out = sageattn(qh, kh, vh, tensor_layout="HND", is_causal=False)
            except Exception as e:  # noqa: BLE001
                log(dict(shape=label, mode="fp8", name="sageattention-accuracy", skipped=repr(e)[:300]))
        for tag, plan in _fp8_plans(layout, H):
            fl = plan.block_density * dense_flops
            extra = dict(block_density=round(plan.block_density, 4))
            rb = rec(label, f"triton-bf16-{tag}", lambda: tri_fn(q, k, v, plan), fl, **extra)
            kb, vb = k.transpose(1, 2), v.transpose(1, 2)
            for prec in precs:
                rf = rec(label, f"triton-{prec}-{tag}", quant_fn(q, k, v, plan, prec), fl, emit=False, **extra)
                # the quantisation prologue alone, both implementations, V^T in the order the launch used
                order = bool(last_launch.get("p8_key_order", True))
                for impl in ("triton", "torch"):
                    try:
                        rf[f"prologue{'' if impl == 'triton' else '_torch'}_ms"] = round(_bench(
                            lambda: quant_fp8.quantize_operands(q, kb, vb, plan.block_k, prec, impl=impl,
                                                                v_key_order=order)), 3)
                    except Exception as e:  # noqa: BLE001
                        log(dict(shape=label, mode="fp8", name=f"{prec}-prologue-{impl}-{tag}", skipped=repr(e)[:300]))
                if quant_fp8.precision_parts(prec)[1]:
                    rf["p8_key_order"] = order
                if "ms" in rf and "ms" in rb:
                    rf["speedup_vs_bf16"] = round(rb["ms"] / rf["ms"], 3)
                    p_ms = rf.get("prologue_ms")
                    if p_ms is not None and rf["ms"] > p_ms:
                        rf["kernel_tflops_est"] = round(fl / ((rf["ms"] - p_ms) * 1e-3) / 1e12, 1)
                log(rf)
            try:  # accuracy on the same inputs
                ob = tri_fn(q, k, v, plan)
                obh = ob.transpose(1, 2)
                acc = dict(shape=label, mode="fp8", name=f"accuracy-{tag}")
                if tag == "dense":
                    if ref is not None:
                        acc["bf16_vs_fp64"] = _err(obh, ref)
                    if sage_out is not None:
                        acc["sage_vs_bf16"] = _err(sage_out, obh)
                        if ref is not None:
                            acc["sage_vs_fp64"] = _err(sage_out, ref)
                for prec in precs:
                    o8 = tri_fn(q, k, v, plan, precision=prec)
                    acc[f"{prec}_vs_bf16"] = _err(o8, ob)
                    if tag == "dense":
                        o8h = o8.transpose(1, 2)
                        if ref is not None:
                            acc[f"{prec}_vs_fp64"] = _err(o8h, ref)
                        if sage_out is not None:
                            acc[f"{prec}_vs_sage"] = _err(o8h, sage_out)
                    del o8
                log(acc)
                del ob, obh
            except Exception as e:  # noqa: BLE001
                log(dict(shape=label, mode="fp8", name=f"accuracy-{tag}", skipped=repr(e)[:300]))
        del q, k, v, qh, kh, vh, ref, sage_out
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    # launch variants of each precision, then warp specialisation (last), on the first shape
    if part == "main":
        return
    label = shapes[0]
    layout, q, k, v = _fp8_inputs(label)
    B, S, H, D = q.shape
    for tag, plan in _fp8_plans(layout, H):
        if tag not in ("dense", "blocksparse-d0.25"):
            continue
        fl = plan.block_density * 4 * B * H * S * S * D
        extra = dict(block_density=round(plan.block_density, 4))
        for prec in precs:
            for bn, warps, stages in FP8_VARIANTS:
                with _env(VIDATTN_TRITON_BLOCK_N=bn, VIDATTN_TRITON_WARPS=warps, VIDATTN_TRITON_STAGES=stages):
                    rec(label, f"triton-{prec}-{tag}-bn{bn}-w{warps}-s{stages}", quant_fn(q, k, v, plan, prec), fl,
                        **extra)
    if not args.no_ws:
        for tag, plan in _fp8_plans(layout, H):
            if tag not in ("dense", "blocksparse-d0.25"):
                continue
            fl = plan.block_density * 4 * B * H * S * S * D
            extra = dict(block_density=round(plan.block_density, 4))
            for tma, warps in (("1", None), ("0", None), ("1", 8)):
                sfx = f"-ws-tma{tma}" + (f"-w{warps}" if warps else "")
                with _env(VIDATTN_WARP_SPECIALIZE=1, VIDATTN_TRITON_TMA=tma, VIDATTN_TRITON_WARPS=warps):
                    rec(label, f"triton-bf16-{tag}{sfx}", lambda: tri_fn(q, k, v, plan), fl, **extra)
                    for prec in precs:
                        rec(label, f"triton-{prec}-{tag}{sfx}", quant_fn(q, k, v, plan, prec), fl, **extra)


def _precision_list(text: str):
    """``--precision``'s value: ``"bf16"`` -> None, else a comma-separated list of quantised
    precisions (``all``: every one) -> tuple."""
    if text == "bf16":
        return None
    names = QUANT_PRECISIONS if text == "all" else tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in names if x not in QUANT_PRECISIONS]
    if bad or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--precision must be bf16, all, or distinct names of {QUANT_PRECISIONS} "
                                         f"separated by commas, got {text!r}")
    return names


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vidattn bench attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default="", help="write all records here")
    p.add_argument("--quick", action="store_true", help="Wan shape only")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--backward", action="store_true",
                   help="forward+backward time and peak memory (SDPA cuDNN/flash, FlexAttention, vidattn Triton) "
                        "at the Wan-1.3B shape, densities 0.0625-0.5")
    p.add_argument("--peers", action="store_true",
                   help="peers side by side: cuDNN, FlexAttention (Triton and BACKEND=FLASH), FlashAttention-4 "
                        "block-sparse, SageAttention dense, vidattn Triton (each skipped with a reason if it does not load)")
    p.add_argument("--precision", type=_precision_list, default=None, dest="precisions", metavar="PRECISION",
                   help="bf16 (default: the plain benchmark), or quantised precisions of the kernel, comma-separated "
                        "(fp8, int8, int8_fp8; all = the three): each next to bf16 and SageAttention (times, TFLOP/s, "
                        "relative L2 / cosine vs the bf16 kernel and exact float64 attention on the same inputs), "
                        "launch variants and warp-specialisation rows")
    p.add_argument("--no-ws", action="store_true", help="with a quantised --precision: skip the warp-specialisation rows")
    p.add_argument("--fp8-part", choices=("all", "main", "tune"), default="all",
                   help="with a quantised --precision: main = quantised/bf16/SageAttention rows of every shape; tune = "
                        "launch variants and warp specialisation on the Wan shape; all = both (one call may need > 10 "
                        "min)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("vidattn bench attention needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    records = []

    def log(r):
        records.append(r)
        print(json.dumps(r), flush=True)
        if args.json:  # rewritten after every record: a crash or a time-out keeps what ran
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)

    log(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__))
    if args.precisions:
        run_quant(args, log)
    elif args.backward or args.peers:
        if args.backward:
            run_backward(args, log)
        if args.peers:
            run_peers(args, log)
    else:
        if not args.skip_check:
            worst = correctness(log)
            log(dict(check="worst_rel_err", value=worst))
        run(args, log)
    if args.json:  # written before the table, so a table error never loses the records
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    print("\n%-20s %-40s %9s %8s %8s %8s" % ("shape", "name", "ms", "TFLOP/s", "vs flex", "vs cuDNN"))
    for r in records:
        if "ms" in r:
            print("%-20s %-40s %9.3f %8.1f %8s %8s" % (r["shape"], r["name"][:40], r["ms"], r["tflops"],
                                                   r.get("vs_flex") or "", r.get("vs_cudnn_dense") or ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
