"""Static sparse-attention plan files (YAML): what ``vidattn calibrate`` writes and
``vidattn.apply(pipe, vidattn.load_plan("plan.yaml"))`` runs, with no online profiling.

Format (``version: 1``)::

    version: 1
    pattern: {pattern: neighborhood, kernel_size: [3, 7, 7], block_size: 64}   # default pattern
    dense_steps: 2              # first denoising steps run dense
    dense_layers: [0]           # self-attention layer indices kept dense
    heads: null                 # query heads sparsified (null = all)
    backend: auto
    layer_patterns: {3: {pattern: radial, decay_factor: 0.2, block_size: 64}, 4: null}  # null = dense
    layer_heads: {2: [0, 1]}
    meta: {...}                 # free-form: how the plan was found (targets, measured quality/speed)

Patterns are the ``{"pattern": name, **fields}`` dicts of :mod:`vidattn.config`. The loaded object
is a :class:`vidattn.SparseAttentionConfig`.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

__all__ = ["PLAN_FILE_VERSION", "config_to_dict", "config_from_dict", "save_plan", "load_plan", "read_plan_meta"]

PLAN_FILE_VERSION = 1


def config_to_dict(config, meta: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """A :class:`SparseAttentionConfig` (or a bare pattern) as a plain YAML/JSON-safe dict."""
    from vidattn.config import pattern_to_dict
    from vidattn.patterns.base import Pattern
    from vidattn.pipelines.apply import SparseAttentionConfig

    if isinstance(config, Pattern):
        config = SparseAttentionConfig(config)
    if not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig or a vidattn pattern, got {type(config).__name__}")
    d: Dict[str, Any] = {
        "version": PLAN_FILE_VERSION,
        "pattern": pattern_to_dict(config.pattern),
        "dense_steps": int(config.dense_steps),
        "dense_layers": [int(i) for i in config.dense_layers],
        "heads": None if config.heads is None else [int(h) for h in config.heads],
        "backend": config.backend,
        "layer_patterns": {int(k): (None if v is None else pattern_to_dict(v)) for k, v in config.layer_patterns.items()},
        "layer_heads": {int(k): (None if v is None else [int(h) for h in v]) for k, v in config.layer_heads.items()},
    }
    if meta:
        d["meta"] = dict(meta)
    return d


_KEYS = {"version", "pattern", "dense_steps", "dense_layers", "heads", "backend", "layer_patterns", "layer_heads", "meta"}


def config_from_dict(d: Mapping[str, Any]):
    """Inverse of :func:`config_to_dict`. Raises ``ValueError`` naming a bad key or value."""
    from vidattn.config import pattern_from_dict
    from vidattn.pipelines.apply import SparseAttentionConfig

    if not isinstance(d, Mapping):
        raise TypeError(f"a plan must be a mapping, got {type(d).__name__}")
    unknown = set(d) - _KEYS
    if unknown:
        raise ValueError(f"unknown plan keys {sorted(unknown)}; valid: {sorted(_KEYS)}")
    if int(d.get("version", PLAN_FILE_VERSION)) > PLAN_FILE_VERSION:
        raise ValueError(f"plan version {d.get('version')} is newer than this vidattn reads ({PLAN_FILE_VERSION})")
    if "pattern" not in d or not isinstance(d["pattern"], Mapping):
        raise ValueError("a plan needs 'pattern': {pattern: <name>, ...fields}")
    lp = {int(k): (None if v is None else pattern_from_dict(dict(v))) for k, v in (d.get("layer_patterns") or {}).items()}
    lh = {int(k): (None if v is None else tuple(int(h) for h in v)) for k, v in (d.get("layer_heads") or {}).items()}
    heads = d.get("heads")
    return SparseAttentionConfig(pattern_from_dict(dict(d["pattern"])), dense_steps=int(d.get("dense_steps", 0)),
                                 dense_layers=tuple(int(i) for i in d.get("dense_layers") or ()),
                                 heads=None if heads is None else tuple(int(h) for h in heads),
                                 backend=str(d.get("backend", "auto")), layer_patterns=lp, layer_heads=lh)


def save_plan(config, path: str, meta: Optional[Mapping[str, Any]] = None) -> str:
    """Write ``config`` (:class:`SparseAttentionConfig` or pattern) to ``path`` (.yaml/.yml/.json),
    atomically. Returns ``path``."""
    import json

    import yaml

    from vidattn.pipelines.video_io import atomic_write_text

    d = config_to_dict(config, meta)
    ext = os.path.splitext(str(path))[1].lower()
    if ext == ".json":
        text = json.dumps(d, indent=2)
    elif ext in (".yaml", ".yml"):
        text = yaml.safe_dump(d, sort_keys=False, default_flow_style=None)
    else:
        raise ValueError(f"plan path must end in .yaml, .yml or .json, got {path!r}")
    atomic_write_text(str(path), text)
    return str(path)


def load_plan(path: str):
    """Read a plan file into a :class:`vidattn.SparseAttentionConfig` (``meta`` is dropped; read
    it with :func:`read_plan_meta`)."""
    d = _read(path)
    d.pop("meta", None)
    try:
        return config_from_dict(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


def read_plan_meta(path: str) -> Dict[str, Any]:
    """The ``meta`` section of a plan file ({} if none)."""
    return dict(_read(path).get("meta") or {})


def _read(path: str) -> Dict[str, Any]:
    import json

    import yaml

    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise ValueError(f"plan file not found: {path!r}")
    with open(path) as fh:
        text = fh.read()
    try:
        d = json.loads(text) if str(path).lower().endswith(".json") else yaml.safe_load(text)
    except Exception as e:
        raise ValueError(f"cannot parse plan file {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise ValueError(f"plan file {path} must hold a mapping, got {type(d).__name__}")
    return d
