"""How far the student is from the teacher, measured every validation and test epoch.

``FidelityMetrics`` collects, over a whole split:

* ``student/acc``, ``teacher/acc``: top-1 accuracy against the labels;
* ``fidelity/agreement``: top-1 agreement, the student's accuracy against the teacher's argmax
  (torchmetrics' accuracy with the teacher's prediction as the target);
* ``fidelity/kl``: KL(p_t ‖ p_s) at T = 1, summed over classes, averaged over examples;
* ``student/ece``, ``teacher/ece``: expected calibration error (15 bins, L1; torchmetrics);
* ``fidelity/kernel_gap``: ‖K_S − K_T‖_F / ‖K_T‖_F, the relative distance between the student's and
  the teacher's linear kernel (Gram) matrices ``K = X Xᵀ`` over the penultimate embeddings of the
  whole split (Qian et al.'s KDA diagnostic); only when both embeddings are given.

Teacher figures are left out when there is no teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError


class TeacherStudentKL(Metric):
    """Mean over examples of KL(softmax(z_t) ‖ softmax(z_s)); DDP-reduced by summing."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.temperature = temperature
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, student_logits: Tensor, teacher_logits: Tensor) -> None:
        log_ps = F.log_softmax(student_logits.float() / self.temperature, dim=-1)
        log_pt = F.log_softmax(teacher_logits.float() / self.temperature, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
        self.total += kl.sum().double()
        self.count += kl.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp_min(1)).float()


class KernelGap(Metric):
    """``‖K_S − K_T‖_F / ‖K_T‖_F`` with ``K_S = X_S X_Sᵀ``, ``K_T = X_T X_Tᵀ`` over all examples seen.

    The n×n matrices are never formed. With the Gram matrices of the features,
    ``G_SS = X_SᵀX_S`` (d_s×d_s), ``G_TT = X_TᵀX_T`` (d_t×d_t), ``G_ST = X_SᵀX_T`` (d_s×d_t)::

        ‖K_S‖²_F = tr(X_S X_Sᵀ X_S X_Sᵀ) = ‖G_SS‖²_F,   ‖K_T‖²_F = ‖G_TT‖²_F,
        ⟨K_S, K_T⟩_F = tr(X_S X_Sᵀ X_T X_Tᵀ) = ‖G_ST‖²_F,
        ‖K_S − K_T‖²_F = ‖G_SS‖²_F + ‖G_TT‖²_F − 2‖G_ST‖²_F

    an exact identity. The three Gram matrices are sums over examples, so they are the metric's
    states (float64, summed across DDP processes): memory is O(d² + batch·d), independent of the
    number of examples n. The subtraction loses about ``1e-16 / gap²`` in relative precision, which
    matters only for gaps below ~1e-6. Features are flattened and used as they are (no centring
    nor normalisation, as in the paper's linear kernel). The states are sized at the first update;
    under DDP every process must see at least one batch.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("gram_ss", "gram_tt", "gram_st"):
            self.add_state(name, default=torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, student_features: Tensor, teacher_features: Tensor) -> None:
        xs = student_features.detach().flatten(1).double()
        xt = teacher_features.detach().flatten(1).double()
        if xs.shape[0] != xt.shape[0]:
            raise ValueError(f"kernel gap: {xs.shape[0]} student vs {xt.shape[0]} teacher examples")
        if self.gram_ss.numel() == 0:
            self.gram_ss = xs.new_zeros(xs.shape[1], xs.shape[1])
            self.gram_tt = xs.new_zeros(xt.shape[1], xt.shape[1])
            self.gram_st = xs.new_zeros(xs.shape[1], xt.shape[1])
        self.gram_ss += xs.t() @ xs
        self.gram_tt += xt.t() @ xt
        self.gram_st += xs.t() @ xt

    def compute(self) -> Tensor:
        kss, ktt, kst = (
            self.gram_ss.square().sum(),
            self.gram_tt.square().sum(),
            self.gram_st.square().sum(),
        )
        gap = (kss + ktt - 2 * kst).clamp_min(0).sqrt()
        return (gap / ktt.sqrt().clamp_min(torch.finfo(torch.float64).tiny)).float()


class FidelityMetrics(nn.Module):
    def __init__(self, num_classes: int, with_teacher: bool, ece_bins: int = 15):
        super().__init__()
        self.with_teacher = with_teacher

        def acc() -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=num_classes, average="micro")

        def ece() -> MulticlassCalibrationError:
            return MulticlassCalibrationError(num_classes=num_classes, n_bins=ece_bins, norm="l1")

        self.student_acc, self.student_ece = acc(), ece()
        if with_teacher:
            self.teacher_acc, self.teacher_ece, self.agreement = acc(), ece(), acc()
            self.kl = TeacherStudentKL()
            self.kernel_gap = KernelGap()

    def update(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        y: Tensor,
        student_embedding: Tensor | None = None,
        teacher_embedding: Tensor | None = None,
    ) -> None:
        student_logits = student_logits.float()
        self.student_acc.update(student_logits, y)
        self.student_ece.update(student_logits.softmax(-1), y)
        if self.with_teacher and teacher_logits is not None:
            teacher_logits = teacher_logits.float()
            self.teacher_acc.update(teacher_logits, y)
            self.teacher_ece.update(teacher_logits.softmax(-1), y)
            self.agreement.update(student_logits, teacher_logits.argmax(-1))
            self.kl.update(student_logits, teacher_logits)
            if student_embedding is not None and teacher_embedding is not None:
                self.kernel_gap.update(student_embedding, teacher_embedding)

    def compute(self) -> dict[str, Tensor]:
        out = {"student/acc": self.student_acc.compute(), "student/ece": self.student_ece.compute()}
        if self.with_teacher:
            out |= {
                "teacher/acc": self.teacher_acc.compute(),
                "teacher/ece": self.teacher_ece.compute(),
                "fidelity/agreement": self.agreement.compute(),
                "fidelity/kl": self.kl.compute(),
            }
            if self.kernel_gap.update_count > 0:
                out["fidelity/kernel_gap"] = self.kernel_gap.compute()
        return out

    def reset(self) -> None:
        for m in self.children():
            if isinstance(m, Metric):
                m.reset()
