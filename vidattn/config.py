"""Pattern configs: plain dicts (from CLI flags or a YAML/JSON ``--config`` file) <-> pattern objects.

Schema: ``{"pattern": <name>, <field>: <value>, ...}`` where ``<name>`` is one of :data:`PATTERNS`
and the fields are exactly the pattern dataclass's fields (e.g. ``{"pattern": "neighborhood",
"kernel_size": [3, 5, 5], "dilation": 1}``). Lists become tuples. A config file holds one such
dict, or a list of them (several configs, e.g. for the quality harness), or
``{"configs": [...]}``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List

__all__ = ["PATTERNS", "PATTERN_NAMES", "pattern_class", "pattern_name", "pattern_from_dict", "pattern_to_dict", "load_configs", "save_config",
           "parse_value", "parse_int_tuple"]

# The one pattern-name registry: CLI / config / harness / docs name -> (module, class). A new
# family adds one line here; everything else (CLI choices, config parsing, the quality harness)
# reads PATTERN_NAMES / pattern_class / pattern_name.
PATTERNS = {
    "dense": ("vidattn.patterns.dense", "Dense"),
    "neighborhood": ("vidattn.patterns.neighborhood", "Neighborhood"),
    "radial": ("vidattn.patterns.radial", "Radial"),
    "grid": ("vidattn.patterns.grid", "PermutedGrid"),
    "rectified": ("vidattn.patterns.rectified", "RectifiedSparse"),
}

PATTERN_NAMES = tuple(PATTERNS)  # ("dense", "neighborhood", "radial", "grid", "rectified")


def pattern_name(pattern) -> str:
    """The registry name of a pattern instance or class (``TypeError`` for an unregistered one)."""
    cls = pattern if isinstance(pattern, type) else type(pattern)
    for name, (mod, clsname) in PATTERNS.items():
        if cls.__name__ == clsname and cls.__module__ == mod:
            return name
    raise TypeError(f"pattern must be one of the registered vidattn pattern classes ({', '.join(PATTERN_NAMES)}), "
                    f"got {cls.__name__}")


def pattern_class(name: str):
    """The pattern class for a registry name (one of :data:`PATTERN_NAMES`).

    Raises ``ValueError`` for an unknown name, or when the family is not part of this build."""
    import importlib

    if not isinstance(name, str) or name.lower() not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {name!r}")
    mod, cls = PATTERNS[name.lower()]
    try:
        return getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"pattern {name!r} is not available in this build ({e})") from None


def _field_names(cls) -> List[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def _tuplify(v):
    if isinstance(v, list):
        return tuple(_tuplify(x) for x in v)
    return v


def _listify(v):
    if isinstance(v, tuple):
        return [_listify(x) for x in v]
    return v


def pattern_from_dict(cfg: Dict[str, Any]):
    """Build a pattern from ``{"pattern": name, **fields}``.

    Raises ``ValueError`` naming an unknown key (listing the valid ones) and passes on the
    pattern's own ``ValueError``/``TypeError`` for bad values."""
    if not isinstance(cfg, dict):
        raise TypeError(f"config must be a dict like {{'pattern': 'radial', ...}}, got {type(cfg).__name__}")
    if "pattern" not in cfg:
        raise ValueError(f"config needs a 'pattern' key (one of {', '.join(PATTERNS)}), got keys {sorted(cfg)}")
    cls = pattern_class(cfg["pattern"])
    names = _field_names(cls)
    kwargs = {}
    for key, val in cfg.items():
        if key == "pattern":
            continue
        if key not in names:
            raise ValueError(f"unknown option {key!r} for pattern {cfg['pattern']!r}; valid: {', '.join(names) or '(none)'}")
        kwargs[key] = _tuplify(val)
    return cls(**kwargs)


def pattern_to_dict(pattern, *, only_changed: bool = False) -> Dict[str, Any]:
    """Inverse of :func:`pattern_from_dict`: ``{"pattern": name, **fields}`` (tuples as lists,
    JSON/YAML-safe). ``only_changed`` drops fields equal to their default."""
    out: Dict[str, Any] = {"pattern": pattern_name(pattern)}
    for f in dataclasses.fields(pattern):
        if not f.init or f.name.startswith("_"):
            continue
        v = getattr(pattern, f.name)
        if only_changed and f.default is not dataclasses.MISSING and v == f.default:
            continue
        out[f.name] = _listify(v)
    return out


def _read(path: str):
    if not isinstance(path, str) or not os.path.isfile(path):
        raise ValueError(f"config file not found: {path!r}")
    with open(path) as fh:
        text = fh.read()
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".json":
            return json.loads(text)
        if ext in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
    except Exception as e:
        raise ValueError(f"cannot parse config file {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    raise ValueError(f"config file must end in .json, .yaml or .yml, got {path!r}")


def load_configs(path: str) -> List[Dict[str, Any]]:
    """Read a YAML/JSON config file into a list of config dicts (each validated by building its
    pattern once). Raises ``ValueError`` with the file name on any problem."""
    data = _read(path)
    if isinstance(data, dict) and "configs" in data:
        data = data["configs"]
    items = data if isinstance(data, list) else [data]
    if not items:
        raise ValueError(f"config file {path} holds no configs")
    for i, item in enumerate(items):
        try:
            pattern_from_dict(item)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: config #{i}: {e}") from None
    return items


def save_config(pattern_or_cfg, path: str) -> None:
    """Write one pattern (or config dict) to ``path`` (.json/.yaml/.yml), atomically."""
    from vidattn.pipelines.video_io import atomic_write_text

    cfg = pattern_or_cfg if isinstance(pattern_or_cfg, dict) else pattern_to_dict(pattern_or_cfg)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        text = json.dumps(cfg, indent=2) + "\n"
    elif ext in (".yaml", ".yml"):
        import yaml

        text = yaml.safe_dump(cfg, sort_keys=False)
    else:
        raise ValueError(f"path must end in .json, .yaml or .yml, got {path!r}")
    atomic_write_text(path, text)


def parse_value(text: str):
    """A CLI option value: JSON/YAML scalar or list (``3``, ``0.5``, ``true``, ``[3,5,5]``), a
    comma list ``3,5,5`` -> list, ``none`` -> None, else the string."""
    import yaml

    t = text.strip()
    if t.lower() in ("none", "null"):
        return None
    if "," in t and not t.startswith("["):
        return [parse_value(x) for x in t.split(",")]
    try:
        return yaml.safe_load(t)
    except Exception:
        return t


def parse_int_tuple(text: str, name: str):
    """``"3,5,5"`` -> ``(3, 5, 5)``, ``"7"`` -> ``7``. Raises ``ValueError`` naming ``name``."""
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{name} must be an int or comma-separated ints like 3,5,5, got {text!r}") from None
    return vals[0] if len(vals) == 1 else tuple(vals)
