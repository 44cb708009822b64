"""The table of kdx's own models, filled by :func:`register_model` as the zoo modules are imported.

Lookups go through :mod:`kdx.models.registry`, which imports the zoo; the zoo modules import only
this table, so registering a model never imports the registry that reads it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a factory under its function name (``fn(num_classes) -> nn.Module``)."""
    name = fn.__name__
    if name in MODELS and MODELS[name] is not fn:
        raise ValueError(
            f"model '{name}' is registered twice ({MODELS[name].__module__} and {fn.__module__})"
        )
    MODELS[name] = fn
    return fn
