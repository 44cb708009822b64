"""``fitnet``: Romero, Ballas, Kahou, Chassang, Gatta & Bengio, *FitNets: Hints for Thin Deep Nets*
(ICLR 2015).

Formula (RepDistiller ``distiller_zoo/FitNet.py``, ``HintLoss``): a regressor ``r`` maps the
student's hint layer to the teacher's guided layer and the term is their mean squared error::

    L_hint = mean((r(feat_s[h]) − feat_t[h])²)
    L = ce_weight·CE + kd_weight·T²·KL + weight·L_hint

``r`` is RepDistiller's ``ConvReg`` (:class:`~kdx.methods.connectors.ConvReg`: conv sized by the two
spatial sizes, BatchNorm, ReLU), learned with the student. ``feat = stages + [embedding]``.

Defaults (RepDistiller ``train_student.py`` and ``scripts/run_cifar_distill.sh``): hint_layer = 2
(``--hint_layer 2``: the second stage's output), weight β = 100 (``-b 100``), ce_weight γ = 1
(``-r`` default), kd_weight α = 0 (``-a 0``), no pre-training (RepDistiller trains FitNet in one
stage). ``init_epochs > 0`` adds the paper's first stage: for those epochs only ``L_hint`` is
optimised (the student up to the hint layer and ``r``), then the full loss.

Deviations from the paper: like RepDistiller, a single-stage run by default (the paper trains the
hint first, then KD on the whole net with an annealed λ) and a conv+BN+ReLU regressor instead of the
paper's plain conv; our stage outputs are post-activation, as RepDistiller's ``feat`` for FitNet.
When the hint layer is a vector on one side and a map on the other (an MLP student against a CNN
teacher) both are globally pooled to vectors and ``r`` is linear (kdx's choice).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from kdx.errors import KDXError
from kdx.methods.base import register_method
from kdx.methods.connectors import ConvReg
from kdx.methods.feature_layers import feature_list, select_layers
from kdx.methods.repdistiller import RepDistillerMethod
from kdx.models.base import ModelOutput


def hint_loss(student_hint: Tensor, teacher_hint: Tensor) -> Tensor:
    """``mean((s − t)²)`` over every element; the teacher side is detached."""
    return F.mse_loss(student_hint, teacher_hint.detach())


@register_method("fitnet")
class FitNet(RepDistillerMethod):
    def __init__(
        self,
        weight: float = 100.0,
        hint_layer: int = 2,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
        init_epochs: int = 0,
    ):
        super().__init__(weight, ce_weight, kd_weight, temperature, init_epochs)
        self.hint_layer = hint_layer
        self.regressor: ConvReg | None = None  # sized in setup

    def setup(self, student: Any, teacher: Any, datamodule: Any) -> None:
        feats_s, feats_t = self.probe_features(student, teacher, datamodule)
        try:
            (i,), (j,) = (
                select_layers(feats_s, (self.hint_layer,)),
                select_layers(feats_t, (self.hint_layer,)),
            )
        except IndexError:
            raise KDXError(
                f"fitnet: method.hint_layer={self.hint_layer}, but the feature lists (stages + [embedding]) "
                f"have {len(feats_s)} (student) and {len(feats_t)} (teacher) entries"
            ) from None
        s_shape, t_shape = tuple(feats_s[i].shape[1:]), tuple(feats_t[j].shape[1:])
        if self.regressor is None or (self.regressor.student_shape, self.regressor.teacher_shape) != (
            s_shape,
            t_shape,
        ):
            try:
                self.regressor = ConvReg(s_shape, t_shape, use_relu=True).to(feats_s[i].device)
            except ValueError as err:
                raise KDXError(f"fitnet: method.hint_layer={self.hint_layer}: {err}") from None
        self._ready = True

    def hints(self, student: ModelOutput, teacher: ModelOutput) -> tuple[Tensor, Tensor]:
        self.check_ready()
        s = feature_list(student)[self.hint_layer]
        t = feature_list(teacher)[self.hint_layer]
        return self.regressor(s), self.regressor.teacher(t)

    def feature_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        return hint_loss(*self.hints(student, teacher))

    def init_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        return hint_loss(*self.hints(student, teacher))
