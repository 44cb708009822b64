"""Distillation methods: one file per method, each registered by name with a typed schema.

Importing this package imports every module in it, so that each ``@register_method`` runs and its
schema is in Hydra's ConfigStore before a config is composed. A new method is a new file here plus
``conf/method/<name>.yaml``; nothing else changes.
"""

import importlib
import pkgutil

from kdx.methods.base import METHODS, DistillationMethod, register_method

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "DistillationMethod", "register_method"]
