"""Worker of tests/pipelines/test_context_parallel.py: one ``torch.multiprocessing.spawn`` of 2
gloo processes on 127.0.0.1 runs every case; rank 0 writes the results (max abs / relative
differences, call counts) to a file the tests read.

Each case compares a tiny Wan / FLUX transformer under ``enable_parallelism(ContextParallelConfig(
ulysses_degree=2 | ring_degree=2))`` with the same model in a single process (fp32): the sparse
output of vidattn's patterns, and the dense output for ``Dense()``.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))


def patterns(family):
    import vidattn
    from vidattn.patterns.grid import PermutedGrid
    from vidattn.patterns.radial import Radial
    from vidattn.patterns.rectified import RectifiedSparse

    ks = (1, 3, 3) if family == "wan" else (3, 3)
    out = {"neighborhood": lambda: vidattn.Neighborhood(kernel_size=ks, block_size=8),
           "rectified": lambda: RectifiedSparse(block_size=8, keep=0.5),
           "rectified_joint": lambda: RectifiedSparse(block_size=8, keep=0.5, method="joint"),
           "dense": lambda: vidattn.Dense()}
    if family == "wan":  # both need a (T, H, W) video grid
        out["radial"] = lambda: Radial(block_size=8, decay_factor=0.5, sink_frames=0)
        out["permuted_grid"] = lambda: PermutedGrid(block_size=8, num_samples=8, recall=0.5)
    return out


def _diff(a, b):
    d = (a.double() - b.double()).abs().max().item()
    return dict(abs=d, rel=d / max(b.double().abs().max().item(), 1e-12))


def run_cases(rank, world):
    import vidattn
    from diffusers import ContextParallelConfig
    from vidattn.pipelines import SparseAttnProcessor

    from tiny_models import run, tiny_flux, tiny_wan

    builders = {"wan": tiny_wan, "flux": tiny_flux}
    res = {}
    for family, build in builders.items():
        pats = patterns(family)
        # single-process references (no collectives: every rank computes them identically)
        model, inputs, _ = build()
        ref = {"dense": run(model, inputs)}
        for name, mk in pats.items():
            if name == "dense":  # Dense() under CP must equal diffusers' own single-process dense output
                continue
            vidattn.apply(model, mk())
            ref[name] = run(model, inputs)
            vidattn.remove(model)
        for mode in ("ulysses", "ring"):
            cfg = dict(ulysses_degree=world) if mode == "ulysses" else dict(ring_degree=world)
            # order 1: enable_parallelism, then apply (every pattern, apply/remove cycles)
            model, inputs, _ = build()
            originals = dict(model.attn_processors)
            model.enable_parallelism(config=ContextParallelConfig(**cfg))
            for name, mk in pats.items():
                key = f"{family}/{mode}/parallel-then-apply/{name}"
                try:
                    h = vidattn.apply(model, mk())
                    out = run(model, inputs)
                    res[key] = dict(_diff(out, ref[name]), sparse=h.sparse_calls, cp=h.stats.cp_calls,
                                    dense_calls=h.dense_calls, sparse_vs_dense=_diff(ref[name], ref["dense"])["abs"],
                                    head_work={k: dict(v) for k, v in h.stats.head_work.items()},
                                    ring_shard=h.stats.ring_shard_calls, ring_gathered=h.stats.ring_gathered_calls)
                    vidattn.remove(model)
                    assert all(model.attn_processors[k] is v for k, v in originals.items())
                except Exception:
                    res[key] = dict(error=traceback.format_exc())
            # set_attention_backend route: after apply, the user picks "vidattn" / "native"
            for backend in ("vidattn", "native"):
                key = f"{family}/{mode}/set_attention_backend-{backend}/neighborhood"
                try:
                    h = vidattn.apply(model, pats["neighborhood"]())
                    model.set_attention_backend(backend)
                    out = run(model, inputs)
                    res[key] = dict(_diff(out, ref["neighborhood"]), sparse=h.sparse_calls, cp=h.stats.cp_calls)
                    vidattn.remove(model)
                    model.reset_attention_backend()
                except Exception:
                    res[key] = dict(error=traceback.format_exc())
            # set_attn_processor route (hand-installed, after enable_parallelism)
            key = f"{family}/{mode}/set_attn_processor/neighborhood"
            try:
                model.set_attn_processor(SparseAttnProcessor(pats["neighborhood"]()))
                first = run(model, inputs)
                second = run(model, inputs)
                st = model.__dict__["_vidattn_state"]
                res[key] = dict(_diff(second, ref["neighborhood"]), first=_diff(first, ref["neighborhood"])["abs"],
                                sparse=st.stats.sparse_calls, cp=st.stats.cp_calls)
                model.set_attn_processor(originals)
                vidattn.remove(model)
            except Exception:
                res[key] = dict(error=traceback.format_exc())
            # Ulysses: remove() is bit-exact against the never-touched model under the same CP
            if mode == "ulysses":
                key = f"{family}/{mode}/remove-bit-exact/dense"
                try:
                    fresh, _, _ = build()
                    fresh.enable_parallelism(config=ContextParallelConfig(**cfg))
                    res[key] = dict(equal=bool(torch.equal(run(model, inputs), run(fresh, inputs))))
                except Exception:
                    res[key] = dict(error=traceback.format_exc())
            # order 2: apply, then enable_parallelism
            for name in ("neighborhood", "rectified"):
                key = f"{family}/{mode}/apply-then-parallel/{name}"
                try:
                    model, inputs, _ = build()
                    h = vidattn.apply(model, pats[name]())
                    model.enable_parallelism(config=ContextParallelConfig(**cfg))
                    out = run(model, inputs)
                    res[key] = dict(_diff(out, ref[name]), sparse=h.sparse_calls, cp=h.stats.cp_calls)
                    vidattn.remove(model)
                except Exception:
                    res[key] = dict(error=traceback.format_exc())
    res.update(run_grad_cases(world))
    res.update(run_ltx_cases(world))
    # Ring per-shard plans on FLUX: 16 text + 8x8 image tokens, so each shard's [text_r, image_r]
    # (8 + 32 tokens) is whole blocks of 8
    model, inputs, _ = tiny_flux(height=8, width=8, text=16)
    pats = patterns("flux")
    ref = {}
    for name in ("neighborhood", "rectified_joint"):
        vidattn.apply(model, pats[name]())
        ref[name] = run(model, inputs)
        vidattn.remove(model)
    model.enable_parallelism(config=ContextParallelConfig(ring_degree=world))
    for name in ("neighborhood", "rectified_joint"):
        key = f"flux16/ring/parallel-then-apply/{name}"
        try:
            h = vidattn.apply(model, pats[name]())
            out = run(model, inputs)
            res[key] = dict(_diff(out, ref[name]), sparse=h.sparse_calls, cp=h.stats.cp_calls,
                            ring_shard=h.stats.ring_shard_calls, ring_gathered=h.stats.ring_gathered_calls)
            vidattn.remove(model)
        except Exception:
            res[key] = dict(error=traceback.format_exc())
    return res


def _grads(model, inputs, reduce):
    """Gradients of ``sum(out * w)`` (fixed random ``w``) w.r.t. the input ``hidden_states`` and
    the first block's self-attention query weight; under CP each rank's share is summed."""
    import torch.distributed as dist

    model.zero_grad(set_to_none=True)
    x = inputs["hidden_states"].clone().requires_grad_(True)
    out = model(**dict(inputs, hidden_states=x))
    out = out[0] if isinstance(out, (tuple, list)) else out.sample
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * w).sum().backward()
    weight = model.blocks[0].attn1.to_q.weight
    gx, gw = x.grad.clone(), weight.grad.clone()
    if reduce:  # each rank's input slice and its tokens' share of the weight gradient
        dist.all_reduce(gx)
        dist.all_reduce(gw)
    return gx, gw


def run_grad_cases(world):
    """Ulysses backward: gradients under Ulysses-2 equal the single-process ones (sparse and dense)."""
    import vidattn
    from diffusers import ContextParallelConfig

    from tiny_models import tiny_wan

    res = {}
    pats = patterns("wan")
    model, inputs, _ = tiny_wan()
    ref = {"dense": _grads(model, inputs, False)}
    for name in ("neighborhood", "rectified"):
        vidattn.apply(model, pats[name]())
        ref[name] = _grads(model, inputs, False)
        vidattn.remove(model)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    for name in ("dense", "neighborhood", "rectified"):
        key = f"wan/ulysses/grad/{name}"
        try:
            h = vidattn.apply(model, pats[name]()) if name != "dense" else None
            gx, gw = _grads(model, inputs, True)
            res[key] = dict(x=_diff(gx, ref[name][0])["rel"], weight=_diff(gw, ref[name][1])["rel"],
                            sparse=h.sparse_calls if h else 0,
                            sparse_vs_dense=_diff(ref[name][0], ref["dense"][0])["rel"])
            if h is not None:
                vidattn.remove(model)
        except Exception:
            res[key] = dict(error=traceback.format_exc())
    return res


def run_ltx_cases(world):
    """LTX-Video (``_cp_plan`` splits video tokens, text and its mask): Ulysses-2 and Ring-2."""
    import vidattn
    from diffusers import ContextParallelConfig

    from tiny_models import run, tiny_ltx

    res = {}
    model, inputs, _ = tiny_ltx(frames=2, height=4, width=4)  # 32 video tokens
    # 4 text tokens (2 per rank) and no text mask: diffusers 0.42.1 splits encoder_attention_mask
    # with the text but hands the cross-attention the local mask slice after the Ulysses
    # all-to-all gathered the keys (shape error in its own dense path, vidattn not involved)
    inputs = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, :4])
    inputs["encoder_attention_mask"] = None
    pat = lambda: vidattn.Neighborhood(kernel_size=(1, 3, 3), block_size=8)  # noqa: E731
    ref = {"dense": run(model, inputs)}
    vidattn.apply(model, pat())
    ref["neighborhood"] = run(model, inputs)
    vidattn.remove(model)
    for mode in ("ulysses", "ring"):
        cfg = dict(ulysses_degree=world) if mode == "ulysses" else dict(ring_degree=world)
        m, _, _ = tiny_ltx(frames=2, height=4, width=4)
        m.enable_parallelism(config=ContextParallelConfig(**cfg))
        key = f"ltx/{mode}/parallel-then-apply/neighborhood"
        try:
            h = vidattn.apply(m, pat())
            if mode == "ring":  # the text is split too, so the (dense) cross-attention runs Ring: diffusers'
                m.set_attention_backend("vidattn")  # native op has no LSE on CPU, vidattn's dense op does
            out = run(m, inputs)
            res[key] = dict(_diff(out, ref["neighborhood"]), sparse=h.sparse_calls, cp=h.stats.cp_calls,
                            ring_shard=h.stats.ring_shard_calls, ring_gathered=h.stats.ring_gathered_calls,
                            sparse_vs_dense=_diff(ref["neighborhood"], ref["dense"])["abs"])
            vidattn.remove(m)
        except Exception:
            res[key] = dict(error=traceback.format_exc())
    return res


def worker(rank, world, port, out_path, cases="run_cases"):
    """One gloo process: run ``cases`` (the name of a case runner in this module) and let rank 0
    save its result dict to ``out_path``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.accelerator.device_count = lambda: 1  # diffusers divides by it; 0 on a CPU-only machine
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = run_unified_cases() if cases == "run_unified_cases" else run_cases(rank, world)
    except Exception:
        res = {"fatal": dict(error=traceback.format_exc())}
    if rank == 0:
        torch.save(res, out_path)
    dist.barrier()
    dist.destroy_process_group()


def run_unified_cases():
    """Ring-2 x Ulysses-2 (4 processes): tiny Wan / FLUX with 4 heads."""
    import vidattn
    from diffusers import ContextParallelConfig, FluxTransformer2DModel, WanTransformer3DModel
    from vidattn.patterns.rectified import RectifiedSparse

    from tiny_models import run, tiny_flux, tiny_wan

    res = {}
    for fam in ("wan", "flux"):
        torch.manual_seed(0)
        if fam == "wan":
            model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8,
                                          in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                                          num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                          rope_max_seq_len=32).eval()
            _, inputs, _ = tiny_wan(frames=4)
            pats = {"neighborhood": vidattn.Neighborhood(kernel_size=(1, 3, 3), block_size=8)}
        else:
            model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                           attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                                           pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
            _, inputs, _ = tiny_flux(height=8, width=8, text=4)
            pats = {"neighborhood": vidattn.Neighborhood(kernel_size=(3, 3), block_size=8)}
        pats["rectified"] = RectifiedSparse(block_size=8, keep=0.5)
        ref = {}
        for name, p in pats.items():
            vidattn.apply(model, p)
            ref[name] = run(model, inputs)
            vidattn.remove(model)
        model.enable_parallelism(config=ContextParallelConfig(ring_degree=2, ulysses_degree=2))
        for name, p in pats.items():
            try:
                h = vidattn.apply(model, p)
                out = run(model, inputs)
                res[f"{fam}/{name}"] = dict(_diff(out, ref[name]), sparse=h.sparse_calls, cp=h.stats.cp_calls,
                                            ring_shard=h.stats.ring_shard_calls,
                                            ring_gathered=h.stats.ring_gathered_calls)
                vidattn.remove(model)
            except Exception:
                res[f"{fam}/{name}"] = dict(error=traceback.format_exc())
    return res
