"""CPU path benchmark: a sparse call on the ``cpu`` backend (SDPA over gathered key blocks) against
dense SDPA on the same tensors, and optionally against the ``reference`` backend.

Two plan kinds per (sequence length, target token density):

* ``block``: every query block keeps ``round(density * NKB)`` random key blocks (its own diagonal
  block among them), all full (no token mask): token density = block density;
* ``window``: a 3-D Neighborhood pattern on a ``(S // 256, 16, 16)`` grid (the pattern's own
  64-token tiled plan, mostly PARTIAL blocks evaluated with the token rule) whose kernel gives the
  token density closest to the target; its block density (kept blocks) is higher, and reported.

Every row reports both densities: ``tok dens`` (fraction of (query, key) pairs the plan allows)
and ``blk dens`` (fraction of (query block, key block) pairs computed). Dense SDPA and the cpu
backend run with the same torch thread count (``--threads``) and are timed alternately; the
reported times are medians over ``--reps`` calls, and with ``--repeat N`` the medians of N such
rounds. ``--clock thread`` measures the calling thread's CPU time (only with ``--threads 1``:
then all work runs on that thread), which a shared, oversubscribed machine disturbs far less
than wall time. ``--check`` compares each sparse output with a float64 masked dense oracle.

Usage::

    python benchmarks/cpu_path.py                       # S 4096 8192, token density 0.1 0.25
    python benchmarks/cpu_path.py --seq 4096 --density 0.25 --heads 2 --threads 1 --json out.json

Prints one table row per case (``speedup`` = dense ms / cpu ms; ``1st ms``: wall time of the first
cpu call, which also builds the per-plan caches: super-blocks and token masks).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

import vidattn
from vidattn import Neighborhood, TokenLayout
from vidattn.plan import FULL, plan_from_block_mask

CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def _time(fn, reps: int, clock: str = "wall") -> float:
    """Median time of ``fn()`` in ms over ``reps`` calls after one warm-up call."""
    return _time_pair(fn, None, reps, clock)[0]


def _time_pair(fa, fb, reps: int, clock: str = "wall"):
    """Median ms of ``fa`` and ``fb`` timed alternately (a shared, noisy machine biases both alike)."""
    now = CLOCKS[clock]
    fa()
    if fb is not None:
        fb()
    ta, tb = [], []
    for _ in range(reps):
        for f, ts in ((fa, ta), (fb, tb)):
            if f is None:
                continue
            t0 = now()
            f()
            ts.append(now() - t0)
    return statistics.median(ta) * 1e3, (statistics.median(tb) * 1e3 if tb else None)


def block_plan(S: int, density: float, block: int, seed: int = 0):
    """Random full-block plan: each query block keeps ``round(density * NKB)`` key blocks."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-S // block)
    keep = max(1, round(density * nb))
    cls = torch.zeros(1, 1, nb, nb, dtype=torch.int8)
    for i in range(nb):
        others = torch.randperm(nb, generator=g)
        chosen = [i] + [int(j) for j in others if int(j) != i][: keep - 1]
        cls[0, 0, i, chosen] = FULL
    return plan_from_block_mask(cls, seq_len=S, block_q=block, block_k=block, rule=None, token_density=keep / nb)


def window_kernel(S: int, density: float):
    """Odd 3-D kernel ``(kt, ks, ks)`` on the ``(S // 256, 16, 16)`` grid whose token density
    ``(kt / T) * (ks / 16) ** 2`` (NATTEN windows: every query sees exactly kernel-many keys) is
    closest to ``density`` from below (else the smallest above)."""
    T = S // 256
    cands = [((kt / T) * (ks / 16) ** 2, kt, ks) for kt in range(1, T + 1) for ks in range(3, 17, 2)]
    below = [c for c in cands if c[0] <= density + 1e-9]
    d, kt, ks = max(below) if below else min(cands)
    return kt, ks


def window_plan(S: int, density: float, heads: int, kernel=None):
    """Neighborhood plan on a (S // 256, 16, 16) grid at about ``density`` token density (or with
    ``kernel = (kt, ks)``); returns (plan, name)."""
    kt, ks = window_kernel(S, density) if kernel is None else kernel
    pat = Neighborhood(kernel_size=(kt, ks, ks))
    return pat.plan(TokenLayout((S // 256, 16, 16)), num_heads=heads), f"na({kt},{ks},{ks})"


def max_err_vs_oracle(q, k, v, plan, out) -> float:
    """Max |out - float64 masked dense attention| (the plan's token mask, original order)."""
    mask = plan.token_mask()[0]  # [Hp, S, S]
    qh, kh, vh = (t.transpose(1, 2)[0].double() for t in (q, k, v))
    err = 0.0
    for h in range(qh.shape[0]):
        for r0 in range(0, qh.shape[1], 1024):  # 1,024 query rows at a time (bounded memory)
            s = (qh[h, r0:r0 + 1024] @ kh[h].T) * q.shape[-1] ** -0.5
            s = s.masked_fill(~mask[h % mask.shape[0], r0:r0 + 1024], float("-inf"))
            ref = torch.softmax(s, -1).nan_to_num(0.0) @ vh[h]
            err = max(err, float((out[0, r0:r0 + 1024, h].double() - ref).abs().max()))
    return err


def main(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 8192], help="sequence lengths (multiples of 256)")
    ap.add_argument("--density", type=float, nargs="+", default=[0.1, 0.25],
                    help="target token densities (fraction of allowed query-key pairs)")
    ap.add_argument("--heads", type=int, nargs="+", default=[2], help="query heads (= key/value heads)")
    ap.add_argument("--head-dim", type=int, default=64, help="head dimension D")
    ap.add_argument("--block", type=int, default=128, help="block size of the random block plans")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per measurement (median)")
    ap.add_argument("--repeat", type=int, default=1, help="measurement rounds per case (median of the medians)")
    ap.add_argument("--clock", default="wall", choices=sorted(CLOCKS),
                    help="wall time, or the calling thread's CPU time (with --threads 1 only)")
    ap.add_argument("--kinds", nargs="+", default=["block", "window"], choices=["block", "window"],
                    help="plan kinds to run")
    ap.add_argument("--kernel", type=int, nargs=2, default=None, metavar=("KT", "KS"),
                    help="window plans: kernel (KT, KS, KS) instead of the one chosen by --density")
    ap.add_argument("--reference", action="store_true", help="also time the reference backend (slow)")
    ap.add_argument("--check", action="store_true", help="max abs error vs a float64 masked dense oracle")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write the rows as JSON to this path")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        ap.error("--clock thread needs --threads 1 (other threads' work would not be counted)")
    rows = []
    print(f"{'S':>6} {'kind':>14} {'H':>2} {'thr':>3} {'tok dens':>8} {'blk dens':>8} {'dense ms':>9} "
          f"{'cpu ms':>8} {'speedup':>8} {'1st ms':>8} {'ref ms':>8} {'max err':>9}")
    for S in args.seq:
        for H in args.heads:
            g = torch.Generator().manual_seed(S)
            q, k, v = (torch.randn(1, S, H, args.head_dim, generator=g) for _ in range(3))
            qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
            dense = lambda: F.scaled_dot_product_attention(qh, kh, vh)  # noqa: E731
            for dens in args.density:
                for kind in args.kinds:
                    if kind == "block":
                        plan, name = block_plan(S, dens, args.block), f"block{args.block}"
                    else:
                        plan, name = window_plan(S, dens, H, args.kernel)
                    run = lambda: vidattn.run_plan(q, k, v, plan, backend="cpu")  # noqa: E731
                    t0 = time.perf_counter()
                    run()  # the first call also builds the per-plan caches (groups, masks)
                    first_ms = (time.perf_counter() - t0) * 1e3
                    pairs = [_time_pair(dense, run, args.reps, args.clock) for _ in range(args.repeat)]
                    dense_ms = statistics.median(p[0] for p in pairs)
                    cpu_ms = statistics.median(p[1] for p in pairs)
                    ref_ms = err = None
                    if args.reference:
                        ref_ms = _time(lambda: vidattn.run_plan(q, k, v, plan, backend="reference"),
                                       max(1, args.reps // 2), args.clock)
                    if args.check:
                        err = max_err_vs_oracle(q, k, v, plan, run())
                    row = dict(seq_len=S, kind=name, heads=H, head_dim=args.head_dim, threads=torch.get_num_threads(),
                               clock=args.clock, target_token_density=dens,
                               token_density=round(float(plan.token_density), 4),
                               block_density=round(plan.block_density, 4), dense_sdpa_ms=round(dense_ms, 2),
                               cpu_ms=round(cpu_ms, 2), speedup_vs_dense=round(dense_ms / cpu_ms, 2),
                               cpu_first_call_wall_ms=round(first_ms, 1),
                               reference_ms=None if ref_ms is None else round(ref_ms, 2),
                               max_abs_err_vs_oracle=err)
                    rows.append(row)
                    print(f"{S:>6} {name:>14} {H:>2} {row['threads']:>3} {row['token_density']:>8.3f} "
                          f"{row['block_density']:>8.3f} {dense_ms:>9.1f} {cpu_ms:>8.1f} "
                          f"{row['speedup_vs_dense']:>8.2f} {first_ms:>8.0f} "
                          f"{'' if ref_ms is None else f'{ref_ms:.1f}':>8} {'' if err is None else f'{err:.1e}':>9}",
                          flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
