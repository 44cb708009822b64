"""``ab``: Heo, Lee, Yun & Choi, *Knowledge Transfer via Distillation of Activation Boundaries Formed
by Hidden Neurons* (AAAI 2019).

Formula (RepDistiller ``distiller_zoo/AB.py``, code from the authors): per paired layer a connector
``r`` maps the student feature to the teacher's layout (identity when channels and size agree, else
``ConvReg`` without ReLU); the alternative-L2 loss pushes each connected student response beyond a
margin ``m`` on the side where the teacher neuron is active or inactive::

    ℓ(s, t) = Σ (s + m)² · [s > −m ∧ t ≤ 0] + (s − m)² · [s ≤ m ∧ t > 0]
    L_ab = Σ_layers 2^(l − n + 1) · ℓ(r(f_s), f_t) / B · 3 / 1000        (l = 0 … n−1)

RepDistiller uses it only to pre-train: for ``--init_epochs 30`` epochs it optimises ``L_ab`` alone
(student feature layers + connectors, ``helper/pretrain.py``); the training after that has no AB term
(``loss_kd = 0``: CE only, with ``-b 1`` unused). Ours: for the first ``init_epochs`` epochs of the run
``loss = L_ab`` (logged as ``ab_init``, ``init_phase = 1``); afterwards
``ce_weight·CE + kd_weight·T²·KL + weight·L_ab`` with weight 0 by default.

Defaults (RepDistiller ``train_student.py``, ``scripts/run_cifar_distill.sh``): layers =
``feat[1:-1]``, margin m = 1 (``ABLoss(margin=1.0)``), init_epochs = 30, weight = 0 (the official
main phase), γ = 1, α = 0.

Deviations from the paper: RepDistiller (and the paper) read pre-activation features
(``preact=True``); kdx's stages are the post-activation outputs, so ``t ≤ 0`` means "exactly zero
after ReLU" for ReLU teachers (WRN stages are pre-activation in both). The init epochs count inside
``trainer.max_epochs`` (RepDistiller runs them before its 240 epochs: use ``trainer.max_epochs=270``
and milestones shifted by 30 to mirror it) and share the student's optimizer and lr (RepDistiller:
a fresh SGD at the same lr). On vectors the connector is linear + BatchNorm.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdx.methods.base import register_method
from kdx.methods.connectors import ConvReg
from kdx.methods.feature_layers import feature_list, parse_layers
from kdx.methods.repdistiller import RepDistillerMethod
from kdx.models.base import ModelOutput


def alternative_l2(source: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """``Σ (s+m)²·[s > −m ∧ t ≤ 0] + (s−m)²·[s ≤ m ∧ t > 0]`` over every element (a sum)."""
    target = target.detach()
    inactive = ((source > -margin) & (target <= 0)).to(source.dtype)
    active = ((source <= margin) & (target > 0)).to(source.dtype)
    return ((source + margin).pow(2) * inactive + (source - margin).pow(2) * active).sum()


def ab_loss(sources: list[Tensor], targets: list[Tensor], margin: float = 1.0) -> Tensor:
    """``Σ_l 2^(l−n+1) · ℓ_l / B · 3/1000`` (RepDistiller's scaling; deeper layers weigh more)."""
    n, batch = len(sources), sources[0].shape[0]
    return sum(
        2.0 ** (layer - n + 1) * alternative_l2(s, t, margin) / batch * 3 / 1000
        for layer, (s, t) in enumerate(zip(sources, targets))
    )


@register_method("ab")
class AB(RepDistillerMethod):
    def __init__(
        self,
        weight: float = 0.0,
        layers: str = "1:-1",
        margin: float = 1.0,
        init_epochs: int = 30,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
    ):
        super().__init__(weight, ce_weight, kd_weight, temperature, init_epochs)
        if margin < 0:
            raise ValueError(f"method.margin={margin} must be >= 0")
        self.layers, self._spec, self.margin = layers, parse_layers(layers), margin
        self.pairs: list[tuple[int, int]] = []
        self.connectors = nn.ModuleList()  # one per pair, built in setup
        self._shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def setup(self, student: Any, teacher: Any, datamodule: Any) -> None:
        feats_s, feats_t = self.probe_features(student, teacher, datamodule)
        pairs = self.layer_pairs(feats_s, feats_t, self._spec, "method.layers")
        shapes = [(tuple(feats_s[i].shape[1:]), tuple(feats_t[j].shape[1:])) for i, j in pairs]
        if shapes != self._shapes:
            device = feats_s[0].device
            self.connectors = nn.ModuleList(
                nn.Identity() if s == t else ConvReg(s, t, use_relu=False).to(device) for s, t in shapes
            )
            self._shapes = shapes
        self.pairs = pairs
        self._ready = True

    def connected(self, student: ModelOutput, teacher: ModelOutput) -> tuple[list[Tensor], list[Tensor]]:
        self.check_ready()
        feats_s, feats_t = feature_list(student), feature_list(teacher)
        sources, targets = [], []
        for (i, j), connector in zip(self.pairs, self.connectors):
            sources.append(connector(feats_s[i]))
            t = feats_t[j].detach()
            targets.append(connector.teacher(t) if isinstance(connector, ConvReg) else t)
        return sources, targets

    def init_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        return ab_loss(*self.connected(student, teacher), margin=self.margin)

    def feature_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        return ab_loss(*self.connected(student, teacher), margin=self.margin)
