"""Load weights into a model from any checkpoint a user is likely to have, safely.

A plain ``state_dict``, a Lightning checkpoint (kdx's own, whose student or teacher weights are
taken, or any whose keys match after a ``model.`` prefix), or RepDistiller's ``{'model': ...}``
files; always with ``torch.load(..., weights_only=True)``. Any mismatch is one
:class:`~kdx.errors.KDXError` line that names the file and what did not fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdx.errors import KDXError

# Lightning checkpoints of kdx runs keep models under these prefixes; the one named like the
# model asked for wins (a kdx run trained with method=none holds only a student).
_PREFIXES = ("teacher.model.", "student.model.", "model.", "module.")


def _state_dict_from(obj: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        full = obj["state_dict"]
        for prefix in sorted(_PREFIXES, key=lambda p: not p.startswith(f"{what}.")):
            picked = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
            if picked:
                return picked
        return full
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # RepDistiller's released teachers
        return _state_dict_from(obj["model"], path, what)
    raise KDXError(f"{what} checkpoint {path} holds neither a state_dict nor a Lightning checkpoint")


def load_weights(model: nn.Module, path: str | Path, what: str = "teacher") -> None:
    path = Path(path)
    if not path.is_file():
        raise KDXError(
            f"{what} checkpoint not found: {path}; pass {what}.ckpt=<existing file> "
            f"or {what}.ckpt=auto to train and cache one"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise KDXError(
            f"{what} checkpoint {path} cannot be loaded safely (weights_only=True): "
            f"{str(err).splitlines()[0]}"
        ) from None
    state = _state_dict_from(obj, path, what)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KDXError(
            f"{what} checkpoint {path} does not fit {what} model {type(model).__name__}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
            f"is {what}= the architecture the checkpoint was trained with?"
        )
    for key, value in state.items():
        if own[key].shape != value.shape:
            hint = ""
            if value.dim() >= 1 and own[key].dim() == value.dim() and own[key].shape[1:] == value.shape[1:]:
                hint = (
                    f" — class-count mismatch: the checkpoint has {value.shape[0]} classes, "
                    f"the model {own[key].shape[0]}; check dataset= and the checkpoint"
                )
            raise KDXError(
                f"{what} checkpoint {path}: '{key}' has shape {tuple(value.shape)} in the file "
                f"but {tuple(own[key].shape)} in the model{hint}"
            )
    model.load_state_dict(state)
