"""``vid``: Ahn, Hu, Damianou, Lawrence & Dai, *Variational Information Distillation for Knowledge
Transfer* (CVPR 2019).

Formula (RepDistiller ``distiller_zoo/VID.py``, code from the authors): per paired layer, a regressor
``μ`` (1×1 conv → ReLU → 1×1 conv → ReLU → 1×1 conv, no bias; widths C_s → C_t → C_t → C_t) predicts
the teacher feature from the student's, with a learned per-channel variance
``σ²_c = softplus(s_c) + ε``; the term is the Gaussian negative log-likelihood (without the
constant), averaged over every element, summed over the layers::

    L_vid = Σ_layers mean_{b,c,x} ½ ((μ(f_s) − f_t)² / σ²_c + log σ²_c)
    L = ce_weight·CE + kd_weight·T²·KL + weight·L_vid

``s_c`` starts at ``log(exp(init_pred_var − ε) − 1)`` so that ``σ²_c`` starts at ``init_pred_var``.
The larger of the two maps is average-pooled to the smaller first.

Defaults (RepDistiller ``train_student.py`` / ``scripts/run_cifar_distill.sh``): layers =
``feat[1:-1]``, ``VIDLoss(s, t, t)`` (middle width = C_t), init_pred_var = 5, ε = 1e-5, weight
β = 1 (``-b 1``), γ = 1, α = 0.

Deviations from the paper: none beyond RepDistiller's (one shared variance per channel, the
regressor above, post-activation stage outputs). On vectors the 1×1 convs are linear layers; a
vector against a map pools the map to a vector (kdx's choice).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdx.methods.base import register_method
from kdx.methods.connectors import pointwise_layer
from kdx.methods.feature_layers import feature_list, match_spatial, parse_layers, spatial_rank
from kdx.methods.repdistiller import RepDistillerMethod
from kdx.models.base import ModelOutput


def vid_nll(prediction: Tensor, target: Tensor, log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    """``mean ½((μ − t)²/σ² + log σ²)`` with ``σ²_c = softplus(log_scale_c) + eps`` per channel (axis 1)."""
    variance = F.softplus(log_scale) + eps
    variance = variance.view(1, -1, *([1] * (prediction.dim() - 2)))
    return (0.5 * ((prediction - target.detach()).pow(2) / variance + variance.log())).mean()


class VIDRegressor(nn.Module):
    """The mean regressor of one layer pair plus its per-channel log-scale."""

    def __init__(self, c_s: int, c_t: int, spatial_axes: int, init_pred_var: float, eps: float):
        super().__init__()
        self.spatial_axes = spatial_axes
        self.regressor = nn.Sequential(
            pointwise_layer(c_s, c_t, spatial_axes, bias=False),
            nn.ReLU(),
            pointwise_layer(c_t, c_t, spatial_axes, bias=False),
            nn.ReLU(),
            pointwise_layer(c_t, c_t, spatial_axes, bias=False),
        )
        self.log_scale = nn.Parameter(torch.full((c_t,), math.log(math.expm1(init_pred_var - eps))))

    def forward(self, f_s: Tensor) -> Tensor:
        return self.regressor(f_s)


@register_method("vid")
class VID(RepDistillerMethod):
    def __init__(
        self,
        weight: float = 1.0,
        layers: str = "1:-1",
        init_pred_var: float = 5.0,
        eps: float = 1e-5,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
    ):
        super().__init__(weight, ce_weight, kd_weight, temperature)
        if eps <= 0 or init_pred_var <= eps:
            raise ValueError(f"method.eps={eps} must be > 0 and method.init_pred_var={init_pred_var} > eps")
        self.layers, self._spec = layers, parse_layers(layers)
        self.init_pred_var, self.eps = init_pred_var, eps
        self.pairs: list[tuple[int, int]] = []
        self.regressors = nn.ModuleList()  # one per pair, built in setup

    def setup(self, student: Any, teacher: Any, datamodule: Any) -> None:
        feats_s, feats_t = self.probe_features(student, teacher, datamodule)
        pairs = self.layer_pairs(feats_s, feats_t, self._spec, "method.layers")
        shapes = []
        for i, j in pairs:
            s, t = match_spatial(feats_s[i], feats_t[j])
            shapes.append((s.shape[1], t.shape[1], spatial_rank(t)))
        built = [
            (r.regressor[0].weight.shape[1], r.log_scale.shape[0], r.spatial_axes) for r in self.regressors
        ]
        if built != shapes:
            device = feats_s[0].device
            self.regressors = nn.ModuleList(
                VIDRegressor(c_s, c_t, axes, self.init_pred_var, self.eps).to(device)
                for c_s, c_t, axes in shapes
            )
        self.pairs = pairs
        self._ready = True

    def feature_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        feats_s, feats_t = feature_list(student), feature_list(teacher)
        total = 0
        for (i, j), reg in zip(self.pairs, self.regressors):
            s, t = match_spatial(feats_s[i], feats_t[j].detach())
            total = total + vid_nll(reg(s), t, reg.log_scale, self.eps)
        return total
