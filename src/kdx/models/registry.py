"""One name → model registry (timm-style), plus factories for timm and torchvision models.

Configs build every model through this module (``_target_: kdx.models.registry.create_model``),
so a model is chosen by name on the command line (``student.model.name=resnet8x4``). kdx never
downloads weights: the timm and torchvision factories refuse ``pretrained`` / ``weights`` and point
to ``teacher.ckpt=<path>`` instead.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence

from torch import nn

import kdx.models.cifar  # noqa: F401 - the zoo registers its models on import
from kdx.models.catalog import MODELS

NO_DOWNLOADS = "no downloads in kdx; pass teacher.ckpt=<path>"


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of kdx's own models matching a shell-style ``pattern``."""
    return sorted(n for n in MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build kdx model ``name``; an unknown name is an error that suggests close ones."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown kdx model '{name}'.{hint} Known: {', '.join(sorted(MODELS))}. "
            "For timm / torchvision models use student=timm / student=torchvision."
        )
    return MODELS[name](num_classes=num_classes, **kwargs)


def timm_model(
    name: str, num_classes: int, input_shape: Sequence[int] | None = None, pretrained: bool = False, **kwargs
) -> nn.Module:
    """Any timm model by name, randomly initialised; ``in_chans`` follows a (C, H, W) ``input_shape``.

    Extra keyword arguments go to ``timm.create_model`` (e.g. ``img_size=32`` for a ViT).
    """
    if pretrained:
        raise ValueError(NO_DOWNLOADS)
    import timm  # heavy: imported only when a timm model is asked for

    if input_shape is not None and len(input_shape) == 3:
        kwargs.setdefault("in_chans", int(input_shape[0]))
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ValueError(
            f"unknown timm model '{name}'" + (f"; similar: {', '.join(close)}" if close else "")
        ) from err


def torchvision_model(name: str, num_classes: int, weights: str | None = None, **kwargs) -> nn.Module:
    """Any torchvision classification model by name, randomly initialised (``weights=None``)."""
    if weights is not None or kwargs.pop("pretrained", False):
        raise ValueError(NO_DOWNLOADS)
    import torchvision  # heavy: imported only when a torchvision model is asked for

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
