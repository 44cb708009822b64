"""``kda``: Qian, Li & Hu, *Improved Knowledge Distillation via Full Kernel Matrix Transfer*
(arXiv 2009.14416, SDM 2022; official code idstcv/KDA). See docs/methods.md §1.

The full n×n kernel ``K = X Xᵀ`` over the data set is approximated with Nyström landmarks; with the
class centres as landmarks, matching the partial matrices ``C = X Dᵀ`` (examples × centres) bounds
‖K_S − K_T‖_F. Per batch, as in the official ``loss.py``::

    S_s = F_s C_sᵀ,   S_t = F_t C_tᵀ                       (B, C): linear kernel to each class centre
    L_KDA = smooth_l1(S_s, S_t, reduction='sum') / ‖S_t‖_F  (Frobenius norm, not squared)
    L = ce_weight·CE + α·Σ_layers L_KDA [+ kd_weight·T²·KL(p_t ‖ p_s)]   with α applied from epoch ``warm`` on

``F`` are the penultimate features (``layer=embedding``, "before FC") or the logits
(``layer=logits``, "after FC"), unnormalised; ``layer=[embedding, logits]`` sums the term over both
layers, each with its own centres (our reading of the paper's "Combo"). ``C_s`` (C × d_s) and
``C_t`` (C × d_t) are the per-class means of the student's and the teacher's features over the
*previous* training epoch (train-mode forward, detached); each model keeps its own centres, so
d_s ≠ d_t needs no connector. Centres and the teacher side carry no gradient.

The batch is the global one. Under DDP (``global_batch=true``, default) the features of all
processes are gathered (the student's with their gradient) and every process computes the loss over
the whole batch, as the official single-GPU (DataParallel) code does over its batch of 256: the sum
and the norm are over the same examples whatever the number of devices. ``global_batch=false``
computes it per device, which scales the effective α by about 1/√k on k devices. Gradients: every
process holds the same loss L; the gather's backward sums the k identical contributions to each
local feature and DDP averages the parameter gradients over the k processes, so the update is ∇L.

Defaults (official ``main_kda.py``): α = 0.04, warm = 5, smooth-L1 β = 1, CE weight 1, no KD term.
``kd_weight > 0`` adds Hinton KD at ``temperature``. The official LR warm-up lasts ``warm`` epochs;
``conf/optim/sgd_kda.yaml`` reads ``method.warm`` (:func:`kdx.schedules.warmup_cosine`).

State: the centres, the per-class counts they came from and the epoch they belong to are buffers
(one set per layer). The running sums of the current epoch are in the ``state_dict`` too (as extra
state, not buffers: DDP broadcasts buffers from rank 0 at every forward, which would overwrite each
rank's partial sums). At the end of each training epoch the sums and counts are all-reduced
(``torch.distributed`` when initialised) and become the next epoch's centres. A checkpoint taken at
the end of an epoch (Lightning's default) therefore carries the exact centres; one taken mid-epoch
carries that epoch's partial sums, which resume continues (under DDP, only rank 0's share survives).

Deviations from the paper: we follow the official code, not the paper's text (which we could not
read in full): class counts are recounted every epoch and all-reduced (the official code counts
them in epoch 0 only, which breaks under DDP, ``drop_last`` or a resumed start epoch); a class seen
in no example of an epoch keeps its previous centre (the official code divides by zero); before the
first centres exist the KDA term is 0 even when ``warm = 0`` (official: 0/0 = NaN); the paper's
"Combo" is unclear (KDA on several layers, or KDA + KD) — both are expressible (a list of layers,
``kd_weight``); α = 0.04 is tuned for batch 256 and 512-d ReLU features (the loss is a sum over the
batch), re-tune it elsewhere.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdx.context import StepContext
from kdx.distributed import distributed, gather_batch
from kdx.losses import kd_loss
from kdx.methods.base import DistillationMethod, SoftTarget, Terms, hinton_target, register_method
from kdx.methods.buffers import LazyBuffers
from kdx.models.base import EMBEDDING, LOGITS, ModelOutput

LAYERS = ("embedding", "logits")


def landmark_similarities(features: Tensor, centres: Tensor) -> Tensor:
    """Linear kernel between each example and each class centre: ``(B, d) @ (C, d)ᵀ → (B, C)``."""
    return features @ centres.t()


def kda_loss(
    student_features: Tensor,
    teacher_features: Tensor,
    student_centres: Tensor,
    teacher_centres: Tensor,
    beta: float = 1.0,
) -> Tensor:
    """``smooth_l1(F_s C_sᵀ, F_t C_tᵀ, 'sum') / ‖F_t C_tᵀ‖_F``; only ``student_features`` gets a gradient."""
    s_sim = landmark_similarities(student_features, student_centres.detach().to(student_features.dtype))
    with torch.no_grad():
        t_sim = landmark_similarities(teacher_features.detach(), teacher_centres.to(teacher_features.dtype))
    norm = torch.linalg.vector_norm(t_sim).clamp_min(torch.finfo(t_sim.dtype).tiny)
    return F.smooth_l1_loss(s_sim, t_sim, reduction="sum", beta=beta) / norm


class ClassCentres(LazyBuffers, nn.Module):
    """One layer's class centres (student and teacher), their counts and this epoch's running sums."""

    def __init__(self) -> None:
        super().__init__()
        # Sized in setup (or at the first batch); LazyBuffers resizes them when a checkpoint loads.
        self.register_buffer("student_centres", torch.zeros(0, 0))
        self.register_buffer("teacher_centres", torch.zeros(0, 0))
        self.register_buffer("centre_counts", torch.zeros(0, dtype=torch.long))
        self.register_buffer("centres_epoch", torch.tensor(-1, dtype=torch.long))  # -1: no centres yet
        self._reset_sums()
        self._has_centres = False

    def _reset_sums(self) -> None:
        self._student_sum: Tensor | None = None
        self._teacher_sum: Tensor | None = None
        self._count: Tensor | None = None
        self._sum_epoch = -1

    def get_extra_state(self) -> dict[str, Tensor]:
        if self._count is None:
            return {}
        return {
            "student_sum": self._student_sum,
            "teacher_sum": self._teacher_sum,
            "count": self._count,
            "epoch": torch.tensor(self._sum_epoch, dtype=torch.long),
        }

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self._reset_sums()
        if state:
            self._student_sum = state["student_sum"].clone()
            self._teacher_sum = state["teacher_sum"].clone()
            self._count = state["count"].clone()
            self._sum_epoch = int(state["epoch"])

    @property
    def has_centres(self) -> bool:
        return self._has_centres  # a Python mirror of centres_epoch >= 0: no device sync per step

    @property
    def sized(self) -> bool:
        return self.student_centres.numel() > 0

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._has_centres = int(self.centres_epoch) >= 0

    def size(self, num_classes: int, d_s: int, d_t: int) -> None:
        shapes = ((num_classes, d_s), (num_classes, d_t))
        if (tuple(self.student_centres.shape), tuple(self.teacher_centres.shape)) == shapes:
            return
        device = self.centres_epoch.device
        self.student_centres = torch.zeros(shapes[0], device=device)
        self.teacher_centres = torch.zeros(shapes[1], device=device)
        self.centre_counts = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.centres_epoch.fill_(-1)
        self._has_centres = False
        self._reset_sums()

    def roll(self, epoch: int) -> None:
        """Turn sums left over from an earlier epoch into centres (e.g. after a resume that skipped
        the end-of-epoch hook); sums of this same epoch (a mid-epoch resume) keep accumulating."""
        if self._count is not None and self._sum_epoch != epoch:
            self.finalise()

    @torch.no_grad()
    def accumulate(self, student_features: Tensor, teacher_features: Tensor, y: Tensor, epoch: int) -> None:
        s, t = student_features.detach().double(), teacher_features.detach().double()
        if not self.sized:
            raise RuntimeError("KDA centres are not sized yet: call setup() or loss() first")
        if self._count is None:
            num_classes = self.student_centres.shape[0]
            self._student_sum = s.new_zeros(num_classes, s.shape[1])
            self._teacher_sum = t.new_zeros(num_classes, t.shape[1])
            self._count = torch.zeros(num_classes, dtype=torch.long, device=s.device)
            self._sum_epoch = epoch
        elif self._count.device != s.device:  # restored from a checkpoint on another device
            self._student_sum, self._teacher_sum, self._count = (
                self._student_sum.to(s.device),
                self._teacher_sum.to(s.device),
                self._count.to(s.device),
            )
        self._student_sum.index_add_(0, y, s)
        self._teacher_sum.index_add_(0, y, t)
        self._count += torch.bincount(y, minlength=self._count.shape[0])

    @torch.no_grad()
    def finalise(self) -> None:
        """All-reduce the epoch's sums and counts and turn them into class centres."""
        if self._count is None:
            return
        s_sum, t_sum, count = self._student_sum, self._teacher_sum, self._count
        if distributed():
            for tensor in (s_sum, t_sum, count):
                torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        seen = count > 0
        denom = count[seen].unsqueeze(1).double()
        device = self.student_centres.device
        self.student_centres[seen.to(device)] = (s_sum[seen] / denom).to(device, self.student_centres.dtype)
        self.teacher_centres[seen.to(device)] = (t_sum[seen] / denom).to(device, self.teacher_centres.dtype)
        self.centre_counts.copy_(count.to(device))
        self.centres_epoch.fill_(self._sum_epoch)
        self._has_centres = True
        self._reset_sums()


@register_method("kda")
class KDA(DistillationMethod):
    reads = frozenset({LOGITS, EMBEDDING})

    def __init__(
        self,
        alpha: float = 0.04,
        warm: int = 5,
        layer: str | list[str] = "embedding",
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
        beta: float = 1.0,
        global_batch: bool = True,
    ):
        super().__init__()
        layers = (layer,) if isinstance(layer, str) else tuple(layer)
        if not layers or any(name not in LAYERS for name in layers) or len(set(layers)) != len(layers):
            raise ValueError(
                f"method.layer={layer!r} must be one of {', '.join(LAYERS)} or a list of distinct ones"
            )
        if alpha < 0 or ce_weight < 0 or kd_weight < 0:
            raise ValueError("method.alpha, method.ce_weight and method.kd_weight must be >= 0")
        if warm < 0:
            raise ValueError(f"method.warm={warm} must be >= 0")
        if temperature <= 0 or beta <= 0:
            raise ValueError("method.temperature and method.beta must be > 0")
        self.alpha, self.warm, self.layers = alpha, warm, layers
        self.ce_weight, self.kd_weight, self.temperature, self.beta = ce_weight, kd_weight, temperature, beta
        self.global_batch = global_batch
        self.reads = frozenset({LOGITS, EMBEDDING}) if EMBEDDING in layers else frozenset({LOGITS})
        self.centres = nn.ModuleDict({name: ClassCentres() for name in layers})
        self._epoch = 0

    def soft_target(self) -> SoftTarget | None:
        return SoftTarget(self.temperature, hinton_target(self.temperature)) if self.kd_weight > 0 else None

    def _features(self, out: ModelOutput, layer: str | None = None) -> Tensor:
        layer = layer or self.layers[0]
        feats = out.embedding if layer == "embedding" else out.logits
        if feats is None:
            raise RuntimeError("KDA (layer=embedding) needs the model's embedding, but it returned none")
        return feats.flatten(1)

    def _size_from(self, student: ModelOutput, teacher: ModelOutput) -> None:
        for name, centres in self.centres.items():
            if not centres.sized:
                s, t = self._features(student, name), self._features(teacher, name)
                centres.size(student.logits.shape[1], s.shape[1], t.shape[1])

    # -- lifecycle -----------------------------------------------------------------------------
    def run_warnings(self, max_epochs: int | None) -> list[str]:
        if max_epochs is not None and max_epochs != -1 and self.warm >= max_epochs:
            return [
                f"method.warm={self.warm} >= trainer.max_epochs={max_epochs}: the KDA term never switches on "
                "and the run trains with CE only; lower method.warm or train longer"
            ]
        return []

    def setup(self, student: Any, teacher: Any, datamodule: Any) -> None:
        input_shape = None if datamodule is None else datamodule.input_shape
        if teacher is None or input_shape is None:
            return  # sized lazily at the first batch
        s, t = student.probe(tuple(input_shape), self.reads), teacher.probe(tuple(input_shape), self.reads)
        self._size_from(s, t)

    def on_train_epoch_start(self, ctx: StepContext) -> None:
        self._roll(ctx.epoch)

    def on_train_epoch_end(self, ctx: StepContext) -> None:
        self.finalise_centres()

    def _roll(self, epoch: int) -> None:
        self._epoch = epoch
        for centres in self.centres.values():
            centres.roll(epoch)

    def finalise_centres(self) -> None:
        """All-reduce the epoch's sums and counts (every layer) and turn them into class centres."""
        for centres in self.centres.values():
            centres.finalise()

    # -- step ----------------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], ctx: StepContext) -> Terms:
        x, y, index = batch
        epoch = ctx.epoch
        if epoch != self._epoch or any(
            c._count is not None and c._sum_epoch != epoch for c in self.centres.values()
        ):
            self._roll(epoch)
        student_out = ctx.student(x, self.reads)
        teacher_out = self.teacher_forward(ctx, x)
        terms = self.loss(student_out, teacher_out, y, index)
        for name, centres in self.centres.items():
            centres.accumulate(
                self._features(student_out, name), self._features(teacher_out, name), y, self._epoch
            )
        return terms

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, y: Tensor, index: Tensor) -> Terms:
        self._size_from(student, teacher)
        ce = F.cross_entropy(student.logits, y)
        loss = self.ce_weight * ce
        kda = student.logits.new_zeros(())
        for name, centres in self.centres.items():
            if not centres.has_centres:
                continue
            s_feat, t_feat = self._features(student, name), self._features(teacher, name)
            if self.global_batch:  # the loss over every process's examples (see the module docstring)
                s_feat, t_feat = gather_batch(s_feat, with_gradient=True), gather_batch(t_feat, False)
            kda = kda + kda_loss(s_feat, t_feat, centres.student_centres, centres.teacher_centres, self.beta)
        if self._epoch >= self.warm:
            loss = loss + self.alpha * kda
        else:
            kda = kda.detach()  # logged from the start, optimised from epoch `warm` on
        terms = {"ce": ce, "kda": kda}
        if self.kd_weight > 0:
            terms["kd"] = kd_loss(student.logits, teacher.logits, self.temperature)
            loss = loss + self.kd_weight * terms["kd"]
        terms["loss"] = loss
        return terms
