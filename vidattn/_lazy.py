"""Module attributes resolved on first access (PEP 562 module ``__getattr__``).

A package that re-exports heavy names (diffusers processors, optional families) builds its
``__getattr__`` with :func:`lazy_attributes`, so importing the package does not import them.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Iterable

__all__ = ["lazy_attributes"]


def lazy_attributes(namespace: dict, exports: Dict[str, Iterable[str]], submodules: Iterable[str] = ()) -> Callable:
    """A module ``__getattr__`` for the module whose globals are ``namespace``.

    Args:
        namespace: the module's ``globals()`` (its ``__name__`` names the module in errors and is the
            package of ``submodules``).
        exports: ``{module name: names}``; each name resolves to that module's attribute of the same name.
        submodules: names resolving to the submodules ``<package>.<name>`` themselves.
    Returns:
        ``__getattr__(name)``: imports and returns the value on first use and stores it in ``namespace``
        (later lookups no longer reach it); an unknown name raises ``AttributeError`` as a module does.
    """
    owner = namespace["__name__"]
    where = {name: (mod, name) for mod, names in exports.items() for name in names}
    where.update({name: (f"{owner}.{name}", None) for name in submodules})

    def __getattr__(name):
        if name not in where:
            raise AttributeError(f"module {owner!r} has no attribute {name!r}")
        mod_name, attr = where[name]
        mod = importlib.import_module(mod_name)
        value = mod if attr is None else getattr(mod, attr)
        namespace[name] = value
        return value

    return __getattr__
