"""``backward``: Jafari, Rezagholizadeh & Ghodsi, *Improved knowledge distillation by utilizing
backward pass knowledge in neural networks* (arXiv 2301.12006, 2023).

KD matches the student to the teacher only on the training points. This method also matches them
where they disagree most: it moves each input along the input-gradient of the teacher–student
divergence ("backward-pass knowledge") and distils on those auxiliary samples as well.

Formula, with ``D(x) = KL(softmax(f_t(x)/T) ‖ softmax(f_s(x)/T))`` per sample:

* generation (k steps, from ``x_0 = x``; both models in ``eval()``, no parameter gradient)::

      g     = ∇_x D(x_i)
      x_i+1 = Π( x_i + η · g / ‖g‖₂ )      step=normalized (per-sample L2; g = 0 gives no step)
      x_i+1 = Π( x_i + η · sign(g) )       step=sign (FGSM-style)

  ``Π`` clamps to the data range ``[clamp_min, clamp_max]`` and/or projects onto the ε-ball around
  ``x`` (L2 ball for the normalized step, L∞ ball for the sign step), when those are set.
* loss (student in train mode)::

      L = (1-α)·CE(z_s(x), y) + α·T²·KL(p_t(x) ‖ p_s(x)) + λ_aux·T²·KL(p_t(x_aux) ‖ p_s(x_aux))

  No CE on ``x_aux``: its label is unknown, the teacher is the target.

Modes:

* ``online`` (default): fresh auxiliary samples for every batch, from that batch, by the current
  student. Clean and auxiliary samples go through the student in one forward (BatchNorm sees the
  union, as if the auxiliary samples were in the training set).
* ``offline``: once per epoch, in ``on_train_epoch_start``, an auxiliary set is generated from the
  un-augmented training split (``datamodule.train_eval_dataloader()``; a fresh random subset of
  ``offline_size`` samples when > 0) with the student as it is at the start of the epoch; the
  teacher's logits on it are cached (the teacher is fixed). Training on "the union" is done by
  adding, at each step, the λ_aux KL term on the next batch (same size as the clean batch) of a
  per-epoch permutation of that set, so one epoch visits the auxiliary set about once when it is as
  large as the training split. The set is kept on CPU and not checkpointed (it is rebuilt at the
  start of every epoch, including after a resume).

Defaults: α = 0.9, T = 4 (the RepDistiller KD convention), λ_aux = 1, k = 1, η = 0.05 with the
normalized step, no clamp, online.

Extending to text: generation is a strategy object behind one boundary,
``Perturbation.__call__(inputs, divergence) -> aux_inputs``, where ``divergence(inputs)`` runs both
models and returns the per-sample ``D`` (differentiable w.r.t. the inputs). ``InputGradientAscent``
perturbs the model input tensor (images, signals, vectors). A text variant adds a ``Perturbation``
that, in ``setup(student, teacher)``, takes the embedding tables, maps token ids to embeddings and
ascends on a shared, attention-masked δ in embedding space, returning inputs the text adapter takes
as ``inputs_embeds``; it is registered in ``PERTURBATIONS`` and picked with ``method.space``. The
loss code and the vision strategy stay untouched.

Deviations from the paper: only the abstract could be read (no official code), so everything
beyond "perturb inputs along the gradient of the teacher–student divergence and augment the
training set" is our choice: the divergence is KL at the distillation temperature T, the step
rules, the projections, the online per-batch generation as default, the offline schedule (once
per epoch, aux batch per step), λ_aux not multiplied by α, and the text (embedding-space) variant
is an extension point only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from kdx.methods.base import DistillationMethod, Terms, check_kd_weights, kd_loss, register_method

log = logging.getLogger(__name__)

Divergence = Callable[[Tensor], Tensor]
STEP_TYPES = ("normalized", "sign")
MODES = ("online", "offline")


def divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per-sample ``KL(softmax(z_t/T) ‖ softmax(z_s/T))``, shape ``(B,)``, without the T² factor.

    Written as ``Σ p_t (log p_t − log p_s)`` with both logs from ``log_softmax``: when the two
    models compute the same function, the gradients through the teacher and through the student
    cancel exactly, so ``∇_x D`` is exactly 0 and the normalized step makes no move.
    """
    log_pt = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_ps = F.log_softmax(student_logits / temperature, dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


@contextlib.contextmanager
def frozen_statistics(*models: nn.Module | None) -> Iterator[None]:
    """Every module in ``eval()`` (BatchNorm uses and keeps its running statistics, no dropout);
    each submodule's own mode is restored on exit."""
    modes = [(m, m.training) for model in models if model is not None for m in model.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class Perturbation:
    """How auxiliary inputs are generated (the strategy boundary; see the module docstring)."""

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Read what the strategy needs from the models (a text variant: the embedding tables)."""

    def __call__(self, inputs: Any, divergence: Divergence) -> Any:
        raise NotImplementedError


class InputGradientAscent(Perturbation):
    """``steps`` steps of gradient ascent on ``D`` w.r.t. the model's input tensor."""

    def __init__(
        self,
        steps: int = 1,
        step_size: float = 0.05,
        step: str = "normalized",
        clamp_min: float | None = None,
        clamp_max: float | None = None,
        epsilon: float | None = None,
    ):
        self.steps = steps
        self.step_size = step_size
        self.step = step
        self.clamp_min = clamp_min
        self.clamp_max = clamp_max
        self.epsilon = epsilon

    def direction(self, grad: Tensor) -> Tensor:
        if self.step == "sign":
            return grad.sign()
        norm = grad.flatten(1).norm(dim=1).view(-1, *([1] * (grad.dim() - 1)))
        # a zero gradient (teacher == student) gives no step, not 0/0
        return torch.where(
            norm > 0, grad / norm.clamp_min(torch.finfo(grad.dtype).tiny), torch.zeros_like(grad)
        )

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        if self.epsilon is not None:
            delta = x_adv - x
            if self.step == "sign":
                delta = delta.clamp(-self.epsilon, self.epsilon)
            else:
                norm = delta.flatten(1).norm(dim=1).view(-1, *([1] * (delta.dim() - 1)))
                delta = delta * (self.epsilon / norm.clamp_min(self.epsilon))
            x_adv = x + delta
        if self.clamp_min is not None or self.clamp_max is not None:
            x_adv = x_adv.clamp(self.clamp_min, self.clamp_max)
        return x_adv

    def __call__(self, inputs: Tensor, divergence: Divergence) -> Tensor:
        if not torch.is_floating_point(inputs):
            raise TypeError(
                f"method=backward perturbs the input tensor, but the inputs are {inputs.dtype}; "
                "discrete inputs (token ids) need an embedding-space Perturbation"
            )
        x = inputs.detach()
        x_adv = x.clone()
        with torch.enable_grad():
            for _ in range(self.steps):
                x_adv.requires_grad_(True)
                # autograd.grad w.r.t. the input only: no parameter's .grad is touched
                (grad,) = torch.autograd.grad(divergence(x_adv).sum(), x_adv, allow_unused=True)
                step = torch.zeros_like(x_adv) if grad is None else self.direction(grad)
                x_adv = self.project(x_adv.detach() + self.step_size * step, x)
        return x_adv.detach()


PERTURBATIONS: dict[str, type[Perturbation]] = {"input": InputGradientAscent}


def _trainer(host: Any) -> Any:
    """``host.trainer``, or None when the host is not attached to one (Lightning raises then)."""
    try:
        return getattr(host, "trainer", None)
    except RuntimeError:
        return None


@register_method("backward")
class BackwardPassKD(DistillationMethod):
    def __init__(
        self,
        alpha: float = 0.9,
        temperature: float = 4.0,
        aux_weight: float = 1.0,
        steps: int = 1,
        step_size: float = 0.05,
        step: str = "normalized",
        clamp_min: float | None = None,
        clamp_max: float | None = None,
        epsilon: float | None = None,
        mode: str = "online",
        offline_size: int = 0,
        space: str = "input",
    ):
        super().__init__()
        check_kd_weights(alpha, temperature)
        if aux_weight < 0:
            raise ValueError(f"method.aux_weight={aux_weight} must be >= 0")
        if steps < 1:
            raise ValueError(f"method.steps={steps} must be >= 1")
        if step_size < 0:
            raise ValueError(f"method.step_size={step_size} must be >= 0")
        if step not in STEP_TYPES:
            raise ValueError(f"method.step={step!r} must be one of {', '.join(STEP_TYPES)}")
        if epsilon is not None and epsilon <= 0:
            raise ValueError(f"method.epsilon={epsilon} must be > 0 (or null for no ε-ball)")
        if clamp_min is not None and clamp_max is not None and clamp_min > clamp_max:
            raise ValueError(f"method.clamp_min={clamp_min} > method.clamp_max={clamp_max}")
        if mode not in MODES:
            raise ValueError(f"method.mode={mode!r} must be one of {', '.join(MODES)}")
        if offline_size < 0:
            raise ValueError(f"method.offline_size={offline_size} must be >= 0 (0: the whole training split)")
        if space not in PERTURBATIONS:
            raise ValueError(f"method.space={space!r} must be one of {', '.join(PERTURBATIONS)}")
        self.alpha = alpha
        self.temperature = temperature
        self.aux_weight = aux_weight
        self.mode = mode
        self.offline_size = offline_size
        self.perturb: Perturbation = PERTURBATIONS[space](
            steps=steps,
            step_size=step_size,
            step=step,
            clamp_min=clamp_min,
            clamp_max=clamp_max,
            epsilon=epsilon,
        )
        # offline auxiliary set (CPU): inputs, cached teacher logits, and the draw order
        self._aux_x: Tensor | None = None
        self._aux_teacher: Tensor | None = None
        self._aux_order: Tensor | None = None
        self._aux_cursor = 0
        self._aux_rng: torch.Generator | None = None

    def setup(self, student: nn.Module, teacher: nn.Module | None, datamodule: Any) -> None:
        self.perturb.setup(student, teacher)

    # -- generation ---------------------------------------------------------------------------
    def generate(self, host: Any, x: Tensor) -> Tensor:
        """Auxiliary inputs for ``x``: the teacher's parameters stay frozen, the student's get no
        gradient, and both models' BatchNorm statistics and modes are left as they were."""

        def d(inputs: Tensor) -> Tensor:
            z_s = host.student(inputs, self.reads).logits
            z_t = host.teacher(inputs, self.reads).logits
            return divergence(z_s, z_t, self.temperature)

        with frozen_statistics(host.student, host.teacher):
            return self.perturb(x, d)

    # -- the step -----------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], host: Any) -> Terms:
        x, y, _ = batch
        if self.mode == "offline":
            x_aux, teacher_aux = self._next_aux_batch(host, x.shape[0])
            x_aux = x_aux.to(x.device, non_blocking=True)
            with torch.no_grad():
                teacher_clean = host.teacher(x, self.reads).logits
            teacher_aux = teacher_aux.to(x.device, teacher_clean.dtype, non_blocking=True)
            teacher_logits = torch.cat([teacher_clean, teacher_aux])
        else:
            x_aux = self.generate(host, x)
            with torch.no_grad():
                teacher_logits = host.teacher(torch.cat([x, x_aux]), self.reads).logits
        student_logits = host.student(torch.cat([x, x_aux]), self.reads).logits
        n = x.shape[0]
        terms = self.terms(student_logits[:n], teacher_logits[:n], y, student_logits[n:], teacher_logits[n:])
        if self.mode == "online":
            terms["aux_dist"] = (x_aux - x).flatten(1).norm(dim=1).mean().detach()
        return terms

    def terms(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        y: Tensor,
        student_aux_logits: Tensor,
        teacher_aux_logits: Tensor,
    ) -> Terms:
        ce = F.cross_entropy(student_logits, y)
        kd = kd_loss(student_logits, teacher_logits, self.temperature)
        aux_kd = kd_loss(student_aux_logits, teacher_aux_logits, self.temperature)
        loss = (1 - self.alpha) * ce + self.alpha * kd + self.aux_weight * aux_kd
        return {"loss": loss, "ce": ce, "kd": kd, "aux_kd": aux_kd}

    # -- offline mode -------------------------------------------------------------------------
    def on_train_epoch_start(self, host: Any) -> None:
        if self.mode == "offline":
            self.build_aux_set(host)

    def build_aux_set(self, host: Any) -> None:
        """Generate the epoch's auxiliary set from the un-augmented training split."""
        datamodule = getattr(_trainer(host), "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "train_eval_dataloader"):
            raise RuntimeError(
                "method.mode=offline needs a kdx data module (train_eval_dataloader()) on the trainer"
            )
        loader: DataLoader = datamodule.train_eval_dataloader()
        self._aux_rng = self._generator(host)
        if self.offline_size:
            n = len(loader.dataset)  # type: ignore[arg-type]
            picked = torch.randperm(n, generator=self._aux_rng)[: min(self.offline_size, n)]
            loader = DataLoader(
                Subset(loader.dataset, picked.tolist()),
                batch_size=loader.batch_size,
                shuffle=False,
                num_workers=loader.num_workers,
                collate_fn=loader.collate_fn,
                pin_memory=loader.pin_memory,
            )
        device = next(host.student.parameters()).device
        xs, zs = [], []
        for batch in loader:
            x = batch[0].to(device)
            x_aux = self.generate(host, x)
            with torch.no_grad(), frozen_statistics(host.teacher):
                zs.append(host.teacher(x_aux, self.reads).logits.float().cpu())
            xs.append(x_aux.cpu())
        self._aux_x, self._aux_teacher = torch.cat(xs), torch.cat(zs)
        self._aux_order = torch.randperm(len(self._aux_x), generator=self._aux_rng)
        self._aux_cursor = 0
        log.info(
            "method=backward: generated %d auxiliary samples for epoch %d",
            len(self._aux_x),
            getattr(host, "current_epoch", 0),
        )

    def _generator(self, host: Any) -> torch.Generator:
        """Reproducible per (run seed, epoch, rank): independent of how much global RNG was used,
        and different on each DDP rank."""
        rank = int(getattr(_trainer(host), "global_rank", 0) or 0)
        epoch = int(getattr(host, "current_epoch", 0) or 0)
        seed = (torch.initial_seed() + 1_000_003 * epoch + 7_919 * rank) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def _next_aux_batch(self, host: Any, size: int) -> tuple[Tensor, Tensor]:
        if self._aux_x is None:  # the epoch hook did not run (e.g. the method is driven by hand)
            self.build_aux_set(host)
        assert self._aux_x is not None and self._aux_teacher is not None and self._aux_order is not None
        picked = []
        while size > 0:
            if self._aux_cursor >= len(self._aux_order):
                self._aux_order = torch.randperm(len(self._aux_order), generator=self._aux_rng)
                self._aux_cursor = 0
            take = self._aux_order[self._aux_cursor : self._aux_cursor + size]
            self._aux_cursor += len(take)
            size -= len(take)
            picked.append(take)
        index = torch.cat(picked)
        return self._aux_x[index], self._aux_teacher[index]
