"""Count host synchronisations per attention call on the GPU (needs CUDA).

    python benchmarks/sync_check.py

Runs each pattern once to build and cache its plan (and compile kernels), then repeats the call
under ``torch.cuda.set_sync_debug_mode("warn")`` and counts the synchronising operations torch
reports. A static pattern's cached plan must cost none; a dynamic one (RectifiedSparse) builds a
new plan per call and should cost none either.
"""
import sys
import warnings

import torch


def count_syncs(fn) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    hits = [w for w in rec if "synchroniz" in str(w.message)]
    for w in hits[:3]:
        print(f"    sync at {w.filename}:{w.lineno}")
    return len(hits)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import vidattn

    layout = vidattn.TokenLayout((21, 30, 52))
    S = layout.seq_len
    q, k, v = (torch.randn(2, S, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cases = {
        "neighborhood (9,15,27)": vidattn.Neighborhood(kernel_size=(9, 15, 27)),
        "neighborhood (3,21,52)": vidattn.Neighborhood(kernel_size=(3, 21, 52)),
        "radial block": vidattn.Radial(granularity="block"),
        "rectified keep 0.1": vidattn.RectifiedSparse(keep=0.1),
    }
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    for name, pat in cases.items():
        if only and only not in name:
            continue
        fn = lambda: vidattn.sparse_attention(q, k, v, pat, layout)  # noqa: E731
        fn()
        n = count_syncs(fn)
        graph = "n/a"
        if n == 0:  # a sync-free call can be captured in a CUDA graph: capture, replay, compare
            try:
                ref = fn()
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    fn()
                torch.cuda.current_stream().wait_stream(stream)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    out = fn()
                g.replay()
                torch.cuda.synchronize()
                graph = f"captured, replay max |diff| {float((out.float() - ref.float()).abs().max()):.2e}"
            except Exception as e:  # report, do not crash
                graph = f"capture failed: {type(e).__name__}: {str(e)[:120]}"
        print(f"{name:26s} host syncs per call: {n}; CUDA graph: {graph}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
