"""Distillation methods: one file per method, each registered by name with a typed schema.

Importing this package imports every module in it, so that each ``@register_method`` runs and its
schema is in Hydra's ConfigStore before a config is composed. A new method is a new file here;
``method=<name>`` then picks it with its typed defaults (``kdx.configs`` registers one config option
per registered method), and a ``conf/method/<name>.yaml`` is only needed for values that differ from
those defaults. Modules without ``@register_method`` hold shared pieces (connectors, buffers, the
RepDistiller base classes, Tang et al.'s targets).
"""

import importlib
import pkgutil

from kdx.methods.base import METHODS, DistillationMethod, register_method

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "DistillationMethod", "register_method"]
