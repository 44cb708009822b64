"""Which features a RepDistiller-family method reads (FitNet, AT, SP, CC, VID, RKD, PKT, AB, FT, FSP, NST).

RepDistiller's models return ``feat = [f0, f1, …, f_last, embedding]``: the stem output, each
stage's output, then the pooled penultimate vector. kdx's zoo models give the same list as
``stages + [embedding]`` (:func:`feature_list`), so a method names its layers exactly as the
official code does: ``feat[1:-1]`` (AT, VID, NST, AB), ``feat[-2]`` (SP, FT), ``feat[-1]`` (CC,
RKD, PKT), ``feat[:-1]`` (FSP), ``feat[hint_layer]`` (FitNet).
"""

from __future__ import annotations

from torch import Tensor

from kdx.methods.connectors import ADAPTIVE_POOL, global_pool
from kdx.models.base import ModelOutput


def feature_list(out: ModelOutput) -> list[Tensor]:
    """RepDistiller's ``feat`` list: every stage output, then the embedding (when the model gave one)."""
    return [*out.stages, *([] if out.embedding is None else [out.embedding])]


def parse_layers(spec: str, param: str = "method.layers") -> slice | tuple[int, ...]:
    """``"1:-1"`` → ``slice(1, -1)``; ``"2"`` → ``(2,)``; ``"1,3"`` → ``(1, 3)`` (Python indexing)."""
    text = str(spec).replace(" ", "")
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 2:
                raise ValueError
            start, stop = (int(p) if p else None for p in parts)
            return slice(start, stop)
        indices = tuple(int(p) for p in text.split(","))
        if not indices:
            raise ValueError
        return indices
    except ValueError:
        raise ValueError(
            f"{param}={spec!r} is not a layer selection: write a Python slice of the feature list "
            "stages + [embedding] ('1:-1', ':-1') or indices ('2', '-1', '1,3')"
        ) from None


def select_layers(feats: list[Tensor], spec: slice | tuple[int, ...]) -> list[int]:
    """The (non-negative) positions of ``feats`` that ``spec`` picks; empty when it picks nothing."""
    n = len(feats)
    if isinstance(spec, slice):
        return list(range(n))[spec]
    out = []
    for i in spec:
        if not -n <= i < n:
            raise IndexError(i)
        out.append(i % n)
    return out


def spatial_rank(x: Tensor) -> int:
    """Number of spatial axes of a ``(B, C, *S)`` feature (0 for a ``(B, C)`` vector)."""
    return x.dim() - 2


def match_spatial(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Bring two maps to one spatial size by adaptive average pooling of the larger one on each axis
    (RepDistiller's rule in AT, VID, FT, FSP, NST); a map against a vector is pooled to a vector."""
    if spatial_rank(a) != spatial_rank(b):
        return global_pool(a), global_pool(b)
    if a.shape[2:] == b.shape[2:]:
        return a, b
    target = tuple(min(p, q) for p, q in zip(a.shape[2:], b.shape[2:]))
    pool = ADAPTIVE_POOL[len(target)]
    return (
        a if tuple(a.shape[2:]) == target else pool(a, target),
        b if tuple(b.shape[2:]) == target else pool(b, target),
    )
