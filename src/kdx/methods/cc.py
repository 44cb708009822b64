"""``cc``: Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, *Correlation Congruence for Knowledge
Distillation* (ICCV 2019).

Formula (RepDistiller ``distiller_zoo/CC.py``, "the authors nicely shared the code"): both
embeddings are mapped by learned linear layers to ``feat_dim`` (``LinearEmbed``; the teacher's map is
trained too), and with ``δ = |e_s − e_t|`` the term is the mean over consecutive pairs of examples in
the batch of ``Σ_j δ_i,j · δ_i+1,j``::

    e_s = W_s·feat_s[-1] + b_s,   e_t = W_t·feat_t[-1] + b_t,   δ = |e_s − e_t|
    L_cc = mean_{i < B} Σ_j δ_{i,j} δ_{i+1,j}
    L = ce_weight·CE + kd_weight·T²·KL + weight·L_cc

Defaults (RepDistiller ``train_student.py`` / ``scripts/run_cifar_distill.sh``): the embeddings
(``feat[-1]``), feat_dim = 128 (``--feat_dim 128``), weight β = 0.02 (``-b 0.02``), γ = 1, α = 0.

Deviations from the paper: the paper matches the correlation matrices of the batch under a
Taylor-expanded Gaussian kernel (plus a KD term); we follow RepDistiller's implementation above, as
the CRD benchmark numbers come from it. Both linear maps are method parameters trained with the
student (the teacher network itself stays frozen).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from kdx.methods.base import register_method
from kdx.methods.repdistiller import RepDistillerMethod
from kdx.models.base import EMBEDDING, LOGITS, ModelOutput


def cc_loss(e_s: Tensor, e_t: Tensor) -> Tensor:
    """``mean_i Σ_j δ_ij δ_(i+1)j`` with ``δ = |e_s − e_t|`` (rows = examples)."""
    delta = (e_s - e_t).abs()
    return (delta[:-1] * delta[1:]).sum(1).mean()


@register_method("cc")
class CC(RepDistillerMethod):
    reads = frozenset({LOGITS, EMBEDDING})

    def __init__(
        self,
        weight: float = 0.02,
        feat_dim: int = 128,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
    ):
        super().__init__(weight, ce_weight, kd_weight, temperature)
        if feat_dim < 1:
            raise ValueError(f"method.feat_dim={feat_dim} must be >= 1")
        self.feat_dim = feat_dim
        self.embed_s: nn.Linear | None = None  # sized in setup
        self.embed_t: nn.Linear | None = None

    def setup(self, student: Any, teacher: Any, datamodule: Any) -> None:
        feats_s, feats_t = self.probe_features(student, teacher, datamodule)
        d_s, d_t = feats_s[-1].flatten(1).shape[1], feats_t[-1].flatten(1).shape[1]
        if self.embed_s is None or (self.embed_s.in_features, self.embed_t.in_features) != (d_s, d_t):
            self.embed_s = nn.Linear(d_s, self.feat_dim).to(feats_s[-1].device)
            self.embed_t = nn.Linear(d_t, self.feat_dim).to(feats_s[-1].device)
        self._ready = True

    def feature_term(self, student: ModelOutput, teacher: ModelOutput) -> Tensor:
        e_s = self.embed_s(student.embedding.flatten(1))
        e_t = self.embed_t(teacher.embedding.detach().flatten(1))
        return cc_loss(e_s, e_t)
