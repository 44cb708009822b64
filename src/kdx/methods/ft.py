"""``ft``: Kim, Park & Kwak, *Paraphrasing Complex Network: Network Compression via Factor Transfer*
(NeurIPS 2018).

Formula (RepDistiller ``distiller_zoo/FT.py`` and ``models/util.py``): a *paraphraser* (a
convolutional autoencoder on the teacher's ``feat[-2]``, encoder of three 3×3 convs to
``rate·C_t`` channels, LeakyReLU 0.1, no BatchNorm) is first trained to reconstruct the teacher
feature; a *translator* (three 3×3 convs with BatchNorm to ``rate·C_t`` channels) maps the student's
``feat[-2]`` to a factor, and the term compares the two factors::

    init phase:   L = mean((dec(enc(f_t)) − f_t)²)          (nn.MSELoss; paraphraser only)
    φ(x) = normalize(mean_c x_c^p1)                                          (per example)
    L_ft = mean |φ(trans(f_s)) − φ(enc(f_t))|^p2       (p2 = 1: L1)
    L = ce_weight·CE + kd_weight·T²·KL + weight·L_ft                         (paraphraser frozen)

The larger of the two factor maps is average-pooled to the smaller first.

Defaults (RepDistiller ``train_student.py``, ``helper/pretrain.py``, ``scripts/run_cifar_distill.sh``):
``feat[-2]`` (the last stage output), rate k = 0.5 (``Paraphraser(k=0.5)``, ``Translator(k=0.5)``),
p1 = 2, p2 = 1 (``FactorTransfer(p1=2, p2=1)``), init_epochs = 30 (``--init_epochs 30``), weight
β = 200 (``-b 200``), γ = 1, α = 0.

Pre-training (RepDistiller ``helper/pretrain.py``), a phase of its own before the main schedule
(:mod:`kdx.pipeline.pretrain`): only the paraphraser trains, on plain MSE, with a fresh SGD at
lr 0.01 for ResNet/WRN students (RepDistiller's list: resnet8…resnet110, resnet8x4, resnet32x4,
wrn_16_1…wrn_40_2) and at the student's own lr otherwise; ``init_lr`` overrides the rule.

Deviations from the paper: RepDistiller's factor comparison (followed here) reduces each factor to a
channel-mean of squares before normalising, where the paper normalises the whole flattened factor;
maps with 1 or 3 spatial axes use ``ConvNd`` of the same design. Vectors are refused (the factor is a map).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdx.context import StepContext
from kdx.errors import KDXError
from kdx.methods.base import register_method
from kdx.methods.connectors import BATCH_NORM, CONV, CONV_TRANSPOSE
from kdx.methods.feature_layers import feature_list, match_spatial, select_layers, spatial_rank
from kdx.methods.repdistiller import RepDistillerMethod
from kdx.models.base import ModelOutput


def _conv_stack(channels: list[int], axes: int, batch_norm: bool, transpose: bool = False) -> nn.Sequential:
    """3×3 (transposed) convs with padding 1 between consecutive widths, each + [BN] + LeakyReLU(0.1)."""
    conv = CONV_TRANSPOSE[axes] if transpose else CONV[axes]
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers.append(conv(c_in, c_out, 3, 1, 1))
        if batch_norm:
            layers.append(BATCH_NORM[axes](c_out))
        layers.append(nn.LeakyReLU(0.1))
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Teacher-side autoencoder: ``C_t → C_t → k·C_t → k·C_t`` and back with transposed convs."""

    def __init__(self, c_t: int, axes: int, rate: float = 0.5):
        super().__init__()
        factor = max(1, int(c_t * rate))
        self.encoder = _conv_stack([c_t, c_t, factor, factor], axes, batch_norm=False)
        self.decoder = _conv_stack([factor, factor, c_t, c_t], axes, batch_norm=False, transpose=True)

    def forward(self, f_t: Tensor) -> tuple[Tensor, Tensor]:
        factor = self.encoder(f_t)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """Student-side encoder: ``C_s → C_s → k·C_t → k·C_t``, with BatchNorm."""

    def __init__(self, c_s: int, c_t: int, axes: int, rate: float = 0.5):
        super().__init__()
        factor = max(1, int(c_t * rate))
        self.encoder = _conv_stack([c_s, c_s, factor, factor], axes, batch_norm=True)

    def forward(self, f_s: Tensor) -> Tensor:
        return self.encoder(f_s)


# RepDistiller's helper/pretrain.py: the students whose paraphraser pre-trains at lr 0.01
PARAPHRASER_LR_001_STUDENTS = frozenset(
    {
        "resnet8",
        "resnet14",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "resnet8x4",
        "resnet32x4",
        "wrn_16_1",
        "wrn_16_2",
        "wrn_40_1",
        "wrn_40_2",
    }
)


def reconstruction_error(reconstruction: Tensor, target: Tensor) -> Tensor:
    """``mean((r − t)²)``, the target detached (``nn.MSELoss()``, RepDistiller's ``criterion_init``)."""
    return F.mse_loss(reconstruction, target.detach())


def factor_map(x: Tensor, p1: float = 2.0) -> Tensor:
    """``normalize(mean_c x^p1)`` per example: (B, C, *S) → (B, ΠS)."""
    return F.normalize(x.pow(p1).mean(1).flatten(1), dim=1)


def factor_loss(factor_s: Tensor, factor_t: Tensor, p1: float = 2.0, p2: float = 1.0) -> Tensor:
    """``mean |φ(F_s) − φ(F_t)|^p2`` after pooling the larger factor map; the teacher side detached."""
    factor_s, factor_t = match_spatial(factor_s, factor_t.detach())
    diff = factor_map(factor_s, p1) - factor_map(factor_t, p1)
    return diff.abs().mean() if p2 == 1 else diff.abs().pow(p2).mean()


@register_method("ft")
class FT(RepDistillerMethod):
    def __init__(
        self,
        weight: float = 200.0,
        layer: int = -2,
        rate: float = 0.5,
        p1: float = 2.0,
        p2: float = 1.0,
        init_epochs: int = 30,
        init_lr: float | None = None,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
    ):
        super().__init__(weight, ce_weight, kd_weight, temperature, init_epochs)
        if not 0 < rate <= 1:
            raise ValueError(f"method.rate={rate} must lie in (0, 1]")
        if p1 <= 0 or p2 <= 0:
            raise ValueError("method.p1 and method.p2 must be > 0")
        if init_lr is not None and init_lr <= 0:
            raise ValueError(f"method.init_lr={init_lr} must be > 0 (or null: RepDistiller's rule)")
        self.layer, self.rate, self.p1, self.p2 = layer, rate, p1, p2
        self.init_lr_override = init_lr
        self.paraphraser: Paraphraser | None = None  # sized in setup
        self.translator: Translator | None = None
        self._shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def setup(self, student: Any, teacher: Any, datamodule: Any) -> None:
        feats_s, feats_t = self.probe_features(student, teacher, datamodule)
        try:
            (i,), (j,) = select_layers(feats_s, (self.layer,)), select_layers(feats_t, (self.layer,))
        except IndexError:
            raise KDXError(
                f"ft: method.layer={self.layer}, but the feature lists (stages + [embedding]) have "
                f"{len(feats_s)} (student) and {len(feats_t)} (teacher) entries"
            ) from None
        f_s, f_t = feats_s[i], feats_t[j]
        axes = spatial_rank(f_t)
        if spatial_rank(f_s) != axes or not 1 <= axes <= 3:
            raise KDXError(
                f"ft needs feature maps with the same number (1-3) of spatial axes at method.layer="
                f"{self.layer}, but got student {tuple(f_s.shape[1:])} and teacher {tuple(f_t.shape[1:])}; "
                "factors are maps (use a convolutional pair, or e.g. method=rkd, pkt, sp for an MLP)"
            )
        shapes = (tuple(f_s.shape[1:]), tuple(f_t.shape[1:]))
        if shapes != self._shapes:
            self.paraphraser = Paraphraser(f_t.shape[1], axes, self.rate).to(f_t.device)
            self.translator = Translator(f_s.shape[1], f_t.shape[1], axes, self.rate).to(f_s.device)
            self._shapes = shapes
        self._ready = True

    def init_step(self, x: Tensor, ctx: StepContext) -> Tensor:
        # the paraphraser learns from the teacher alone: no student forward in this phase
        self.check_ready()
        teacher = self.teacher_forward(ctx, x)
        return self.init_term(None, teacher)

    def init_term(self, student: ModelOutput | None, teacher: ModelOutput) -> Tensor:
        self.check_ready()
        f_t = feature_list(teacher)[self.layer].detach()
        _, reconstruction = self.paraphraser(f_t)
        return reconstruction_error(reconstruction, f_t)

    def init_modules(self, student: nn.Module) -> list[nn.Module]:
        return [self.paraphraser]  # RepDistiller: init_trainable_list = [paraphraser]

    def init_lr(self, student_name: str, lr: float) -> float:
        if self.init_lr_override is not None:
            return self.init_lr_override
        return 0.01 if student_name in PARAPHRASER_LR_001_STUDENTS else lr

    def feature_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        factor_s = self.translator(feature_list(student)[self.layer])
        with torch.no_grad():  # the paraphraser is frozen after its pre-training
            factor_t = self.paraphraser.encoder(feature_list(teacher)[self.layer])
        return factor_loss(factor_s, factor_t, self.p1, self.p2)
