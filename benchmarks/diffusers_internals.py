"""Count the lines of vidattn's own code that reach into diffusers internals.

Two kinds, each counted once per source line:

* ``private``: a name that diffusers defines with a leading underscore (read from the installed
  diffusers' source: module-level names, classes, functions, attributes it assigns), used by
  vidattn as an attribute, an imported name, a bare name or a string (``getattr(x, "_name")``);
  plus the ``enum`` private fields vidattn touches on diffusers' ``AttentionBackendName``.
  Names vidattn defines for itself are not diffusers': a name both define counts only when it is
  in :data:`PROTOCOL` (attributes diffusers sets or reads on vidattn's objects).
* ``python``: Python-internals access (stack frames, frame locals, function globals / code
  objects, building functions): ``sys._getframe``, ``inspect.currentframe`` / ``inspect.stack``,
  ``f_locals`` / ``f_back`` / ``f_globals`` / ``f_code``, ``__globals__``, ``__code__``,
  ``co_names``, ``__closure__``, ``FunctionType(``.

Scanned: the files of ``vidattn/`` (``vidattn/kernels/`` included), ``pipelines/``, ``quality/`` (not tests, not
benchmarks) whose source mentions diffusers (the timm integration reaches into timm, not
diffusers). A bare name counts only where the file imported it from diffusers (a parameter or local
variable of the same name is vidattn's); keyword arguments count (``f(_x=...)``); parameter names
of the functions diffusers calls back (a backend's ``_parallel_config``, a forward op's
``_save_ctx``) are diffusers' calling convention and do not. ``torch.nn.Module``'s own private
attributes are torch's, not diffusers'.

    python benchmarks/diffusers_internals.py            # the list and the totals
    python benchmarks/diffusers_internals.py --json out.json
"""

from __future__ import annotations

import argparse
import ast
import functools
import json
import os
import re
import sys
from typing import Dict, List, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("vidattn", "pipelines", "quality")  # (vidattn/ holds vidattn/kernels/)
# diffusers' private attributes that vidattn also defines, because diffusers sets or reads them
# on vidattn's own objects (the processor protocol, stateful hooks)
PROTOCOL = frozenset({"_attention_backend", "_parallel_config", "_is_stateful", "_keep_in_fp32_modules"})
# Enum internals vidattn writes on diffusers' AttentionBackendName (no public way to add a member)
ENUM_PRIVATE = frozenset({"_member_map_", "_value2member_map_", "_member_names_", "_name_", "_value_"})
PY_ATTRS = frozenset({"_getframe", "currentframe", "f_locals", "f_back", "f_globals", "f_code", "__globals__",
                      "__code__", "co_names", "__closure__"})


def _defined_names(tree) -> Set[str]:
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            out.add(n.attr)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
        elif isinstance(n, ast.alias) and n.asname:
            out.add(n.asname)
    return out


def _py_files(top: str):
    for dp, _, fs in os.walk(top):
        for f in sorted(fs):
            if f.endswith(".py"):
                yield os.path.join(dp, f)


# a diffusers definition of a private name: def / class, an assignment or annotation (``_x =``,
# ``_x: T``, ``obj._x =``), a parameter is not (regex, not ast: diffusers has ~1000 files)
_DEF = re.compile(r"(?:\bdef|\bclass)\s+(_[A-Za-z]\w*)|(?:^|[\s.,(])(_[A-Za-z]\w*)\s*(?::[^=\n]*)?=(?!=)", re.M)


@functools.lru_cache(maxsize=1)
def diffusers_private_names() -> frozenset:
    """Every ``_name`` (not dunder) diffusers defines (installed package), less torch.nn.Module's own."""
    import diffusers
    import torch

    names: Set[str] = set()
    for path in _py_files(os.path.dirname(diffusers.__file__)):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for m in _DEF.finditer(fh.read()):
                names.add(m.group(1) or m.group(2))
    torch_own = set(vars(torch.nn.Module())) | set(dir(torch.nn.Module))
    return frozenset(n for n in names if not n.startswith("__") and n not in torch_own)


def _vidattn_trees(root: str):
    for top in SCANNED:
        for path in _py_files(os.path.join(root, top)):
            with open(path, encoding="utf-8") as fh:
                src = fh.read()
            if "diffusers" in src:
                yield os.path.relpath(path, root), src, ast.parse(src)


def scan(root: str = ROOT) -> List[Dict]:
    """One dict per offending line: ``path``, ``line``, ``kind`` (``private`` / ``python``),
    ``names`` (the internal names on it) and ``text`` (the stripped source line)."""
    trees = list(_vidattn_trees(root))
    own: Set[str] = set()
    for _, _, tree in trees:
        own |= _defined_names(tree)
    private = {n for n in diffusers_private_names() if n not in own or n in PROTOCOL} | ENUM_PRIVATE
    rows: Dict[tuple, Dict] = {}

    def hit(path, lines, node, kind, name):
        key = (path, node.lineno)
        r = rows.setdefault(key, dict(path=path, line=node.lineno, kind=kind, names=[],
                                      text=lines[node.lineno - 1].strip()))
        if kind == "python":
            r["kind"] = "python"
        if name not in r["names"]:
            r["names"].append(name)

    for path, src, tree in trees:
        lines = src.splitlines()
        imported = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and (n.module or "").startswith("diffusers") for a in n.names if a.name in private}
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute):
                inspect_stack = n.attr == "stack" and isinstance(n.value, ast.Name) and n.value.id == "inspect"
                if n.attr in PY_ATTRS or inspect_stack:
                    hit(path, lines, n, "python", n.attr)
                elif n.attr == "FunctionType":
                    hit(path, lines, n, "python", "FunctionType")
                elif n.attr in private:
                    hit(path, lines, n, "private", n.attr)
            elif isinstance(n, ast.Name):
                if n.id == "FunctionType":
                    hit(path, lines, n, "python", "FunctionType")
                elif n.id in imported:
                    hit(path, lines, n, "private", n.id)
            elif isinstance(n, ast.keyword) and n.arg in private:
                hit(path, lines, n, "private", n.arg)
            elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith("diffusers"):
                for a in n.names:
                    if a.name in private:
                        hit(path, lines, n, "private", a.name)
            elif isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in private:
                hit(path, lines, n, "private", n.value)
    return [rows[k] for k in sorted(rows)]


def summary(rows: List[Dict]) -> Dict[str, int]:
    """Counts per kind and in total."""
    p = sum(r["kind"] == "private" for r in rows)
    return dict(private=p, python=len(rows) - p, total=len(rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default="", help="also write {rows, counts} to this path")
    ap.add_argument("--root", default=ROOT, help="checkout to scan (default: this one)")
    a = ap.parse_args(argv)
    rows = scan(a.root)
    for r in rows:
        print(f"{r['kind']:8s} {r['path']}:{r['line']}  [{', '.join(r['names'])}]  {r['text']}")
    counts = summary(rows)
    print(json.dumps(counts))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(rows=rows, counts=counts), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
