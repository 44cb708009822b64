"""``ab``: Heo, Lee, Yun & Choi, *Knowledge Transfer via Distillation of Activation Boundaries Formed
by Hidden Neurons* (AAAI 2019).

Formula (RepDistiller ``distiller_zoo/AB.py``, code from the authors): per paired layer a connector
``r`` maps the student feature to the teacher's layout (identity when channels and size agree, else
``ConvReg`` without ReLU); the alternative-L2 loss pushes each connected student response beyond a
margin ``m`` on the side where the teacher neuron is active or inactive::

    ℓ(s, t) = Σ (s + m)² · [s > −m ∧ t ≤ 0] + (s − m)² · [s ≤ m ∧ t > 0]
    L_ab = Σ_layers 2^(l − n + 1) · ℓ(r(f_s), f_t) / B · 3 / 1000        (l = 0 … n−1)

RepDistiller uses it only to pre-train: for ``--init_epochs 30`` epochs it optimises ``L_ab`` alone
(student feature layers + connectors, ``helper/pretrain.py``), with a fresh SGD at the student's lr
and no schedule; then it trains for its full 240 epochs with a new optimizer, and that training has
no AB term (``loss_kd = 0``: CE only, with ``-b 1`` unused). Ours: the same pre-training phase
(:mod:`kdx.pipeline.pretrain`, ``method.init_epochs`` epochs, the student and the connectors in
train mode), then ``ce_weight·CE + kd_weight·T²·KL + weight·L_ab`` for all of ``trainer.max_epochs``,
with weight 0 by default.

Features: RepDistiller reads them with ``preact=True`` in both phases: each stage's output before
its final ReLU (for WRN, the next block's BatchNorm applied; ``kdx.models.PREACT_STAGES``), so
``t ≤ 0`` is the teacher neuron's activation boundary. ``features=preact`` (default) reads those;
models without a pre-activation definition (kdx's MLP and CNN1D, adapters) need
``method.features=stages`` (post-activation outputs), a deviation from the paper said in the error.

Defaults (RepDistiller ``train_student.py``, ``scripts/run_cifar_distill.sh``): layers =
``feat[1:-1]``, margin m = 1 (``ABLoss(margin=1.0)``), init_epochs = 30, weight = 0 (the official
main phase), γ = 1, α = 0, features = preact.

Deviations: on vectors the connector is linear + BatchNorm.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdx.errors import KDXError
from kdx.methods.base import register_method
from kdx.methods.connectors import ConvReg
from kdx.methods.feature_layers import feature_list, parse_layers
from kdx.methods.repdistiller import RepDistillerMethod
from kdx.models.base import EMBEDDING, LOGITS, PREACT_STAGES, STAGES, ModelOutput, NoPreactStagesError

FEATURES = {"preact": PREACT_STAGES, "stages": STAGES}


def preact_feature_list(out: ModelOutput) -> list[Tensor]:
    """RepDistiller's ``feat`` list under ``preact=True``: the pre-activation stages, then the embedding."""
    return [*out.preact_stages, *([] if out.embedding is None else [out.embedding])]


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
        features: str = "preact",
    ):
        super().__init__(weight, ce_weight, kd_weight, temperature, init_epochs)
        if margin < 0:
            raise ValueError(f"method.margin={margin} must be >= 0")
        if features not in FEATURES:
            raise ValueError(f"method.features={features!r} must be one of {sorted(FEATURES)}")
        self.features = features
        # an instance attribute: what the adapters compute for this run (the class declares the default)
        self.reads = frozenset({LOGITS, EMBEDDING, FEATURES[features]})
        self._feature_list = preact_feature_list if features == "preact" else feature_list
        self.layers, self._spec, self.margin = layers, parse_layers(layers), margin
        self.pairs: list[tuple[int, int]] = []
        self.connectors = nn.ModuleList()  # one per pair, built in setup
        self._shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def setup(self, student: Any, teacher: Any, datamodule: Any) -> None:
        try:
            feats_s, feats_t = self.probe_features(student, teacher, datamodule, self._feature_list)
        except NoPreactStagesError:
            names = [type(getattr(m, "model", m)).__name__ for m in (student, teacher)]
            raise KDXError(
                f"ab reads pre-activation stage features (RepDistiller's preact=True), which kdx defines "
                f"only for the CIFAR zoo, and the pair {names[1]} -> {names[0]} has a model without them; "
                "set method.features=stages to read the post-activation stages (not the paper's features)"
            ) from None
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
        feats_s, feats_t = self._feature_list(student), self._feature_list(teacher)
        sources, targets = [], []
        for (i, j), connector in zip(self.pairs, self.connectors):
            sources.append(connector(feats_s[i]))
            t = feats_t[j].detach()
            targets.append(connector.teacher(t) if isinstance(connector, ConvReg) else t)
        return sources, targets

    def init_modules(self, student: nn.Module) -> list[nn.Module]:
        # RepDistiller: init_trainable_list = [connector, model_s.get_feat_modules()]
        return [self.connectors, student]

    def init_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        return ab_loss(*self.connected(student, teacher), margin=self.margin)

    def feature_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        return ab_loss(*self.connected(student, teacher), margin=self.margin)
