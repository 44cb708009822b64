"""How far the student is from the teacher, measured every validation and test epoch.

``FidelityMetrics`` collects, over a whole split:

* ``student/acc``, ``teacher/acc``: top-1 accuracy against the labels;
* ``student/mcc``, ``student/f1``: the task scores a data module declares (``scores``; GLUE's
  CoLA: Matthews correlation, MRPC and QQP: F1 of the positive class), on the predicted class;
* ``fidelity/agreement``: top-1 agreement, the student's accuracy against the teacher's argmax
  (torchmetrics' accuracy with the teacher's prediction as the target);
* ``fidelity/kl``: KL(p_t ‖ p_s) at T = 1, summed over classes, averaged over examples;
* ``student/ece``, ``teacher/ece``: expected calibration error (15 bins, L1; torchmetrics);
* ``fidelity/kernel_gap``: ‖K_S − K_T‖_F / ‖K_T‖_F, the relative distance between the student's and
  the teacher's linear kernel (Gram) matrices ``K = X Xᵀ`` over the penultimate embeddings of the
  whole split (Qian et al.'s KDA diagnostic); only when both embeddings are given. It depends on
  scale: a student whose embedding is the teacher's times 2 scores 3, a rotated copy scores 0;
* ``fidelity/cka``: linear CKA (Kornblith et al. 2019) between the same two embeddings,
  ``‖Y_cᵀX_c‖²_F / (‖X_cᵀX_c‖_F·‖Y_cᵀY_c‖_F)`` with column-centred features: 1 for a copy that is
  rotated, rescaled or shifted, 0 for unrelated features. Scale-invariant, so it is the companion
  that says whether a kernel gap is geometry or just scale.

Teacher figures are left out when there is no teacher.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import (
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassMatthewsCorrCoef,
)

from kdx.losses import per_sample_kl

# Task scores a data module may declare (``scores``, e.g. GLUE's CoLA and MRPC/QQP), logged as
# ``student/<name>`` beside the accuracy: the metric on the predicted class (argmax of the logits).
SCORES = ("mcc", "f1")


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
        kl = per_sample_kl(student_logits.float(), teacher_logits.float(), self.temperature)
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


class KernelGeometry(KernelGap):
    """The kernel gap and linear CKA from one pass: the Gram states of :class:`KernelGap` plus the
    feature sums and the count, so both are streamed (memory O(d² + batch·d), no n×n matrix).

    Centring, with ``μ = Σx / n``: ``X_cᵀY_c = XᵀY − n·μ_x μ_yᵀ`` (and likewise for ``XᵀX``, ``YᵀY``),
    an exact identity, so::

        CKA = ‖X_cᵀY_c‖²_F / (‖X_cᵀX_c‖_F · ‖Y_cᵀY_c‖_F)

    equals the dense formula ``⟨HK_SH, HK_TH⟩_F / (‖HK_SH‖_F ‖HK_TH‖_F)`` over the n×n linear
    kernels with ``H = I − 11ᵀ/n``. ``compute()`` returns ``{"kernel_gap": ..., "cka": ...}``.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("sum_s", "sum_t"):
            self.add_state(name, default=torch.zeros(0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, student_features: Tensor, teacher_features: Tensor) -> None:
        super().update(student_features, teacher_features)
        xs = student_features.detach().flatten(1).double()
        xt = teacher_features.detach().flatten(1).double()
        if self.sum_s.numel() == 0:
            self.sum_s, self.sum_t = xs.new_zeros(xs.shape[1]), xs.new_zeros(xt.shape[1])
        self.sum_s += xs.sum(0)
        self.sum_t += xt.sum(0)
        self.count += xs.shape[0]

    def cka(self) -> Tensor:
        n = self.count.clamp_min(1)
        mu_s, mu_t = self.sum_s / n, self.sum_t / n
        cross = self.gram_st - n * torch.outer(mu_s, mu_t)
        own_s = self.gram_ss - n * torch.outer(mu_s, mu_s)
        own_t = self.gram_tt - n * torch.outer(mu_t, mu_t)
        denom = own_s.square().sum().sqrt() * own_t.square().sum().sqrt()
        if denom <= 0:  # a constant embedding has no centred geometry to compare
            return torch.tensor(float("nan"))
        return (cross.square().sum() / denom).float()

    def compute(self) -> dict[str, Tensor]:
        return {"kernel_gap": super().compute(), "cka": self.cka()}


def linear_cka(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Linear CKA of two feature matrices (n × d_s, n × d_t) by the streamed formula, in one go."""
    metric = KernelGeometry()
    metric.update(student_features, teacher_features)
    return metric.compute()["cka"]


class FidelityMetrics(nn.Module):
    def __init__(
        self, num_classes: int, with_teacher: bool, ece_bins: int = 15, scores: tuple[str, ...] = ()
    ):
        super().__init__()
        self.with_teacher, self.num_classes = with_teacher, num_classes
        self.scores = nn.ModuleDict()

        def acc() -> MulticlassAccuracy:
            return MulticlassAccuracy(num_classes=num_classes, average="micro")

        def ece() -> MulticlassCalibrationError:
            return MulticlassCalibrationError(num_classes=num_classes, n_bins=ece_bins, norm="l1")

        self.student_acc, self.student_ece = acc(), ece()
        if with_teacher:
            self.teacher_acc, self.teacher_ece, self.agreement = acc(), ece(), acc()
            self.kl = TeacherStudentKL()
            self.kernel = KernelGeometry()
        self.use_scores(scores)

    def update(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        y: Tensor,
        student_embedding: Tensor | None = None,
        teacher_embedding: Tensor | None = None,
    ) -> None:
        student_logits = student_logits.float()
        if len(self.scores):
            predicted = student_logits.argmax(-1)
            for score in self.scores.values():
                score.update(predicted, y)
        self.student_acc.update(student_logits, y)
        self.student_ece.update(student_logits.softmax(-1), y)
        if self.with_teacher and teacher_logits is not None:
            teacher_logits = teacher_logits.float()
            self.teacher_acc.update(teacher_logits, y)
            self.teacher_ece.update(teacher_logits.softmax(-1), y)
            self.agreement.update(student_logits, teacher_logits.argmax(-1))
            self.kl.update(student_logits, teacher_logits)
            if student_embedding is not None and teacher_embedding is not None:
                self.kernel.update(student_embedding, teacher_embedding)

    def compute(self) -> dict[str, Tensor]:
        out = {"student/acc": self.student_acc.compute(), "student/ece": self.student_ece.compute()}
        out |= {f"student/{name}": score.compute() for name, score in self.scores.items()}
        if self.with_teacher:
            out |= {
                "teacher/acc": self.teacher_acc.compute(),
                "teacher/ece": self.teacher_ece.compute(),
                "fidelity/agreement": self.agreement.compute(),
                "fidelity/kl": self.kl.compute(),
            }
            if self.kernel.update_count > 0:
                geometry = self.kernel.compute()
                out["fidelity/kernel_gap"] = geometry["kernel_gap"]
                out["fidelity/cka"] = geometry["cka"]
        return out

    def use_scores(self, scores: tuple[str, ...]) -> None:
        """Measure the task scores ``scores`` (:data:`SCORES`) from now on: Matthews correlation
        (CoLA), F1 of class 1 (MRPC, QQP; binary tasks only)."""
        unknown = [s for s in scores if s not in SCORES]
        if unknown:
            raise ValueError(f"unknown task scores {unknown}; kdx measures {', '.join(SCORES)}")
        if "f1" in scores and self.num_classes != 2:
            raise ValueError(f"the f1 score is for binary tasks, but the task has {self.num_classes} classes")
        device = self.student_acc.device
        for name in scores:
            if name not in self.scores:
                metric = (
                    MulticlassMatthewsCorrCoef(num_classes=self.num_classes)
                    if name == "mcc"
                    else BinaryF1Score()
                )
                self.scores[name] = metric.to(device)

    def reset(self) -> None:
        for m in [*self.children(), *self.scores.values()]:
            if isinstance(m, Metric):
                m.reset()


class LanguageModelMetrics(nn.Module):
    """The fidelity of a causal language model, over every position whose target is not ``-100``:

    * ``student/acc``, ``teacher/acc``: top-1 next-token accuracy;
    * ``student/ppl``, ``teacher/ppl``: perplexity, ``exp`` of the mean next-token cross-entropy over
      the split's tokens (on the held-out splits: held-out perplexity);
    * ``fidelity/agreement``: top-1 agreement of student and teacher per position;
    * ``fidelity/kl``: token-level KL(p_t ‖ p_s) at T = 1, summed over the vocabulary, averaged over
      positions.

    The same interface as :class:`FidelityMetrics` (``update`` with ``(B, L, V)`` logits and ``(B, L)``
    targets), so the module measures either alike. Sums are float64 metric states, summed across DDP
    processes.
    """

    NAMES = ("student_nll", "student_hits", "teacher_nll", "teacher_hits", "agree", "kl", "tokens")

    def __init__(self, num_classes: int, with_teacher: bool, **_: object):
        super().__init__()
        self.with_teacher, self.num_classes = with_teacher, num_classes
        self.sums = _Sums(self.NAMES)

    def update(self, student_logits: Tensor, teacher_logits: Tensor | None, y: Tensor, *_: object) -> None:
        mask = y != -100
        target = y.masked_fill(~mask, 0)
        weights = mask.double()
        log_q = torch.log_softmax(student_logits.float(), -1)
        values = {
            "student_nll": -(log_q.gather(-1, target.unsqueeze(-1)).squeeze(-1).double() * weights).sum(),
            "student_hits": ((log_q.argmax(-1) == target).double() * weights).sum(),
            "tokens": weights.sum(),
        }
        if self.with_teacher and teacher_logits is not None:
            log_p = torch.log_softmax(teacher_logits.float(), -1)
            values["teacher_nll"] = -(
                log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1).double() * weights
            ).sum()
            values["teacher_hits"] = ((log_p.argmax(-1) == target).double() * weights).sum()
            values["agree"] = ((log_p.argmax(-1) == log_q.argmax(-1)).double() * weights).sum()
            values["kl"] = ((log_p.exp() * (log_p - log_q)).sum(-1).double() * weights).sum()
        self.sums.update(values)

    def compute(self) -> dict[str, Tensor]:
        s = self.sums.compute()
        n = s["tokens"].clamp_min(1)
        out = {
            "student/acc": (s["student_hits"] / n).float(),
            "student/ppl": (s["student_nll"] / n).exp().float(),
        }
        if self.with_teacher:
            out |= {
                "teacher/acc": (s["teacher_hits"] / n).float(),
                "teacher/ppl": (s["teacher_nll"] / n).exp().float(),
                "fidelity/agreement": (s["agree"] / n).float(),
                "fidelity/kl": (s["kl"] / n).float(),
            }
        return out

    def use_scores(self, scores: tuple[str, ...]) -> None:
        if scores:
            raise ValueError(f"a language model is scored by perplexity; task scores {scores} do not apply")

    def reset(self) -> None:
        self.sums.reset()


class _Sums(Metric):
    """Named float64 sums, reduced across processes by summing."""

    full_state_update = False

    def __init__(self, names: tuple[str, ...], **kwargs):
        super().__init__(**kwargs)
        self.names = names
        for name in names:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: dict[str, Tensor]) -> None:
        for name, value in values.items():
            setattr(self, name, getattr(self, name) + value)

    def compute(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.names}
