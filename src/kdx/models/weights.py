"""Load weights into a model from any checkpoint a user is likely to have, safely.

A plain ``state_dict``, a Lightning checkpoint (kdx's own, whose student or teacher weights are
taken, or any whose keys match after a ``model.`` prefix), or RepDistiller's ``{'model': ...}``
files; always with ``torch.load(..., weights_only=True)``. Any mismatch is one
:class:`~kdx.errors.KDXError` line that names the file and what did not fit: a file that is not a
PyTorch checkpoint at all (with torch's reason), Python objects besides tensors, missing keys, a
class-count mismatch (only in the output layer), a layer of another size, NaN / infinite weights.

Writing: :class:`AtomicCheckpointIO` makes Lightning write checkpoints atomically in their own folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from kdx.errors import KDXError
from kdx.utils import atomic_torch_save

# Lightning checkpoints of kdx runs keep models under these prefixes; the one named like the
# model asked for wins (a kdx run trained with method=none holds only a student).
_PREFIXES = ("teacher.model.", "student.model.", "model.", "module.")
_ZIP_MAGIC = b"PK\x03\x04"


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


def _torch_reason(err: BaseException) -> str:
    """torch's own reason, without its advice to load with ``weights_only=False`` (kdx never does)."""
    text = str(err)
    refused = [line.strip() for line in text.splitlines() if "unsupported global" in line.lower()]
    if refused:  # the object the unpickler refused, whichever of torch's wordings carries it
        text = refused[0].split("WeightsUnpickler error:", 1)[-1].split(" Please use", 1)[0]
    elif "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        text = text.split(" Please use", 1)[0]
    elif ". " in text:
        text = text.split(". ", 1)[0]
    # torch's advice to retry with weights_only=False must reach no user and no record
    text = ". ".join(part for part in text.split(". ") if "weights_only" not in part)
    return " ".join(text.split()) or f"{type(err).__name__} (the file ends early: empty or truncated)"


UNSAFE = "holds Python objects besides tensors (refused: kdx loads with weights_only=True)"


def _refused_by_weights_only(err: BaseException) -> bool:
    """torch's weights-only unpickler refused an object (whatever its wording of the day)."""
    # a payload names the callable it wanted ("unsupported GLOBAL posix.system", "Unsupported global:
    # GLOBAL ..."); random bytes fail in the same unpickler with "Unsupported operand", which is damage
    return "unsupported global" in str(err).lower()


def read_checkpoint(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)``; a file it cannot read is one :class:`KDXError` line,
    and a pickle with a payload is named as such — never with torch's advice to load it unsafely."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read means one of the things below
        if _refused_by_weights_only(err):
            raise KDXError(
                f"{what} checkpoint {path} {UNSAFE[:-1]}, torch: {_torch_reason(err)}); save the weights alone, "
                "torch.save(model.state_dict(), path), and pass that file"
            ) from None
        with open(path, "rb") as f:
            head = f.read(4)
        reason = _torch_reason(err)
        # a torch file is a zip archive ("PK"), or a legacy pickle (protocol 2: 0x80)
        looks_like_torch = head.startswith(_ZIP_MAGIC) or head[:1] == b"\x80"
        kind = "a damaged or truncated PyTorch checkpoint" if looks_like_torch else "not a PyTorch checkpoint"
        raise KDXError(
            f"{what} checkpoint {path} is {kind} (torch: {reason}); pass a file written by torch.save "
            f"or Lightning{'' if what != 'teacher' else ', or teacher.ckpt=auto to train one'}"
        ) from None


_read = read_checkpoint


def _output_layer(model: nn.Module) -> str | None:
    """The module that produces the logits: the last one registered with parameters of its own."""
    last = None
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is not None:
            last = name
    return last


def load_weights(model: nn.Module, path: str | Path, what: str = "teacher") -> None:
    path = Path(path)
    if not path.is_file():
        raise KDXError(
            f"{what} checkpoint not found: {path}; pass {what}.ckpt=<existing file> "
            f"or {what}.ckpt=auto to train and cache one"
        )
    state = _state_dict_from(_read(path, what), path, what)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise KDXError(
            f"{what} checkpoint {path} does not fit {what} model {type(model).__name__}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
            f"is {what}= the architecture the checkpoint was trained with?"
        )
    output_layer = _output_layer(model)
    for key, value in state.items():
        if own[key].shape == value.shape:
            continue
        in_output_layer = output_layer is not None and key.rsplit(".", 1)[0] == output_layer
        if in_output_layer and value.dim() >= 1 and own[key].shape[1:] == value.shape[1:]:
            hint = (
                f" — class-count mismatch: the checkpoint has {value.shape[0]} classes, the model "
                f"{own[key].shape[0]} (output layer '{output_layer}'); check dataset= and the checkpoint"
            )
        else:
            hint = (
                f" — the layers differ in size (a different width or architecture): is {what}= and its "
                f"{what}.model settings (e.g. channels, width) what the checkpoint was trained with?"
            )
        raise KDXError(
            f"{what} checkpoint {path}: '{key}' has shape {tuple(value.shape)} in the file "
            f"but {tuple(own[key].shape)} in the model{hint}"
        )
    not_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not_finite:
        raise KDXError(
            f"{what} checkpoint {path}: {len(not_finite)} weight tensors hold NaN or infinite values "
            f"(e.g. '{not_finite[0]}'); it was saved from a diverged run — retrain the {what} or pass another "
            "checkpoint"
        )
    model.load_state_dict(state)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing each local checkpoint atomically *in its own folder*.

    Lightning's ``_atomic_save`` goes through fsspec's transaction, which writes a temporary file
    in the system's temp folder (``/tmp``) and moves it into place: across file systems that move is
    a copy, not atomic, and a crash mid-copy leaves a half-written checkpoint. Here the temporary
    file is made next to the target and renamed (:func:`kdx.utils.atomic_torch_save`), with the
    umask's permissions. Remote paths (``s3://`` ...) keep Lightning's own writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)
        return None
