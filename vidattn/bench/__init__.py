"""Importable benchmark code: shared timing helpers, the profiler breakdown and the benchmark runners.

``vidattn bench NAME`` runs :data:`BENCHMARKS` entries by module name (installed modules, no files
of a source checkout are executed); ``benchmarks/*.py`` in the repository are thin wrappers.
"""

BENCHMARKS = {
    # name -> (module, one-line description)
    "attention": ("vidattn.benchmarks.attention", "one attention call: SDPA / FlexAttention / vidattn backends (GPU)"),
    "model": ("vidattn.bench.model", "one denoising step of a full-size Wan / HunyuanVideo / FLUX transformer (GPU; --tiny on CPU)"),
    "timm": ("vidattn.benchmarks.timm_vit", "timm ViT forward: dense vs Neighborhood swaps (GPU; CPU smoke flags)"),
    "parallel": ("vidattn.benchmarks.parallel", "context-parallel sparse attention across GPUs (several GPUs)"),
}

__all__ = ["BENCHMARKS"]
