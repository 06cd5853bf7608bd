"""Name -> function registries for the algorithm's variants (advantage scaling, KL estimators,
ratio levels, loss aggregations): chosen by name in the config, never by an if-chain."""
from __future__ import annotations


def registrar(registry: dict):
    """``@register("name", "alias")`` decorator that files a function under each name."""
    def register(*names: str):
        def deco(fn):
            for n in names:
                registry[n] = fn
            return fn
        return deco
    return register


def lookup(registry: dict, name: str, what: str):
    try:
        return registry[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; valid names: {sorted(registry)}") from None
