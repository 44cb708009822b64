"""How far the student is from the teacher, measured every validation and test epoch.

``FidelityMetrics`` collects, over a whole split:

* ``student/acc``, ``teacher/acc``: top-1 accuracy against the labels;
* ``fidelity/agreement``: top-1 agreement, the student's accuracy against the teacher's argmax
  (torchmetrics' accuracy with the teacher's prediction as the target);
* ``fidelity/kl``: KL(p_t ‖ p_s) at T = 1, summed over classes, averaged over examples;
* ``student/ece``, ``teacher/ece``: expected calibration error (15 bins, L1; torchmetrics).

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

    def update(self, student_logits: Tensor, teacher_logits: Tensor | None, y: Tensor,
               student_embedding: Tensor | None = None, teacher_embedding: Tensor | None = None) -> None:
        student_logits = student_logits.float()
        self.student_acc.update(student_logits, y)
        self.student_ece.update(student_logits.softmax(-1), y)
        if self.with_teacher and teacher_logits is not None:
            teacher_logits = teacher_logits.float()
            self.teacher_acc.update(teacher_logits, y)
            self.teacher_ece.update(teacher_logits.softmax(-1), y)
            self.agreement.update(student_logits, teacher_logits.argmax(-1))
            self.kl.update(student_logits, teacher_logits)

    def compute(self) -> dict[str, Tensor]:
        out = {"student/acc": self.student_acc.compute(), "student/ece": self.student_ece.compute()}
        if self.with_teacher:
            out |= {
                "teacher/acc": self.teacher_acc.compute(),
                "teacher/ece": self.teacher_ece.compute(),
                "fidelity/agreement": self.agreement.compute(),
                "fidelity/kl": self.kl.compute(),
            }
        return out

    def reset(self) -> None:
        for m in self.children():
            if isinstance(m, Metric):
                m.reset()
