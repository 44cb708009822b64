"""``fsp``: Yim, Joo, Bae & Kim, *A Gift from Knowledge Distillation: Fast Optimization, Network
Minimization and Transfer Learning* (CVPR 2017).

Formula (RepDistiller ``distiller_zoo/FSP.py``): the "flow of solution procedure" between two
consecutive layers ``a`` (lower) and ``b`` (upper) of a network is the matrix of their channels'
inner products over the positions (the larger map first average-pooled to the smaller)::

    G(a, b)_{ij} = mean_x b_i(x) · a_j(x)                  (B, C_b, C_a)
    L_fsp = Σ_pairs mean((G_s − G_t)²)

over the consecutive pairs of ``feat[:-1]`` (stem and every stage output). The matrices must have
the same shape on both sides, so student and teacher need equally many layers with equal channel
counts (RepDistiller reports "N/A" for wrn_40_2 → wrn_40_1 for this reason).

RepDistiller uses FSP only to pre-train: for ``--init_epochs 30`` epochs it optimises ``L_fsp`` alone
(the student's feature layers, ``helper/pretrain.py``, a fresh SGD at the student's lr, no
schedule), then runs its full 240 epochs with a new optimizer and no FSP term (``loss_kd = 0``: CE
only, with ``-b 50`` unused). Ours: the same pre-training phase (:mod:`kdx.pipeline.pretrain`,
``method.init_epochs`` epochs, logged as ``fsp_init``), then
``ce_weight·CE + kd_weight·T²·KL + weight·L_fsp`` for all of ``trainer.max_epochs``, weight 0 by
default.

Defaults (RepDistiller ``train_student.py``, ``scripts/run_cifar_distill.sh``): layers ``feat[:-1]``,
init_epochs = 30, weight = 0 (the official main phase), γ = 1, α = 0.

Deviations from the paper: the paper sums squared L2 distances with per-pair weights and pre-trains
then trains on the task (like RepDistiller); we follow RepDistiller's mean-squared form. Vectors are
allowed (a single position).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdx.errors import KDXError
from kdx.methods.base import register_method
from kdx.methods.feature_layers import feature_list, match_spatial, parse_layers
from kdx.methods.repdistiller import RepDistillerMethod
from kdx.models.base import ModelOutput


def fsp_matrix(lower: Tensor, upper: Tensor) -> Tensor:
    """``G_ij = mean_x upper_i(x) · lower_j(x)``: (B, C_upper, C_lower)."""
    lower, upper = match_spatial(lower, upper)
    lower = lower.reshape(lower.shape[0], lower.shape[1], -1)
    upper = upper.reshape(upper.shape[0], upper.shape[1], -1)
    return upper @ lower.transpose(1, 2) / lower.shape[2]


def fsp_matrices(feats: list[Tensor]) -> list[Tensor]:
    """The FSP matrix of every consecutive pair of ``feats``."""
    return [fsp_matrix(a, b) for a, b in zip(feats[:-1], feats[1:])]


def fsp_loss(feats_s: list[Tensor], feats_t: list[Tensor]) -> Tensor:
    """``Σ_pairs mean((G_s − G_t)²)``; the teacher side is detached."""
    g_s, g_t = fsp_matrices(feats_s), fsp_matrices([f.detach() for f in feats_t])
    return sum((s - t).pow(2).mean() for s, t in zip(g_s, g_t))


@register_method("fsp")
class FSP(RepDistillerMethod):
    def __init__(
        self,
        weight: float = 0.0,
        layers: str = ":-1",
        init_epochs: int = 30,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
    ):
        super().__init__(weight, ce_weight, kd_weight, temperature, init_epochs)
        self.layers, self._spec = layers, parse_layers(layers)
        self.pairs: list[tuple[int, int]] = []

    def setup(self, student: Any, teacher: Any, datamodule: Any) -> None:
        feats_s, feats_t = self.probe_features(student, teacher, datamodule)
        pairs = self.layer_pairs(feats_s, feats_t, self._spec, "method.layers")
        widths_s = [feats_s[i].shape[1] for i, _ in pairs]
        widths_t = [feats_t[j].shape[1] for _, j in pairs]
        if len(pairs) < 2 or widths_s != widths_t:
            raise KDXError(
                "fsp compares FSP matrices of consecutive layers, so it needs at least two layers and "
                f"equal channel counts layer by layer; method.layers={self.layers!r} gives student widths "
                f"{widths_s} and teacher widths {widths_t} (pick a pair of equal widths, e.g. "
                "resnet110 -> resnet20, or another method)"
            )
        self.pairs = pairs
        self._ready = True

    def selected(self, student: ModelOutput, teacher: ModelOutput) -> tuple[list[Tensor], list[Tensor]]:
        self.check_ready()
        feats_s, feats_t = feature_list(student), feature_list(teacher)
        return [feats_s[i] for i, _ in self.pairs], [feats_t[j] for _, j in self.pairs]

    def init_modules(self, student: nn.Module) -> list[nn.Module]:
        return [student]  # RepDistiller: init_trainable_list = [model_s.get_feat_modules()]

    def init_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        return fsp_loss(*self.selected(student, teacher))

    def feature_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        return fsp_loss(*self.selected(student, teacher))
