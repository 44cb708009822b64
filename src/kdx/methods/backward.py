"""``backward``: Jafari, Rezagholizadeh & Ghodsi, *Improved knowledge distillation by utilizing
backward pass knowledge in neural networks* (arXiv 2301.12006, 2023). See docs/methods.md §2.

KD matches the student to the teacher only on the training points. This method also matches them
where they disagree most: it moves each input along the input-gradient of the teacher–student
divergence ("backward-pass knowledge") and distils on those auxiliary samples as well.

Formula, with ``D(x)`` the per-sample divergence (``divergence=kl``: ``KL(softmax(f_t(x)/T) ‖
softmax(f_s(x)/T))``; ``divergence=l2``: ``mean_k (f_s(x) − f_t(x))_k²`` on the logits):

* generation (k steps, from ``x_0 = x``; both models in ``eval()``, no parameter gradient)::

      g     = ∇_x D(x_i)
      x_i+1 = Π( x_i + η·s(x) · g / ‖g‖₂ )      step=normalized (per-sample L2 length η·s)
      x_i+1 = Π( x_i + η·c(x) · sign(g) )        step=sign (FGSM-style; each coordinate moves η·c)

  ``s`` and ``c = s/√n`` (n values per sample) make η scale-aware (``step_scale``): ``norm``
  (default) takes ``s`` = the sample's own L2 norm ‖x‖₂, so η is the relative length of the move
  (‖x_aux − x‖ / ‖x‖ = η after one step, for both step rules; ``c`` is the sample's RMS);
  ``rms`` takes ``s`` = the batch's RMS·√n, the same for every sample of the batch; ``absolute``
  takes ``s = c = 1`` (η in input units: the same η moves inputs of different scales by different
  relative amounts); ``token`` (text only) normalises each token by its own norm
  (:mod:`kdx.methods.backward_embedding`). ``Π`` clamps to the data
  range ``[clamp_min, clamp_max]`` and/or projects onto the ε-ball around ``x`` (ε scaled like η:
  L2 radius ε·s for the normalized step, L∞ radius ε·c for the sign step), when those are set. A
  zero gradient (teacher and student compute the same function) gives no step.
* loss (student in train mode)::

      L = (1-α)·CE(z_s(x), y) + α·T²·KL(p_t(x) ‖ p_s(x)) + λ_aux·T²·KL(p_t(x_aux) ‖ p_s(x_aux))

  No CE on ``x_aux``: its label is unknown, the teacher is the target. The auxiliary term is KL
  whatever ``divergence`` picks for generation.

The controls: ``method.step_size=0`` gives ``x_aux = x``, so the run is
``(1-α)·CE + (α+λ_aux)·T²·KL``: KD re-weighted, with no backward-pass knowledge; a gain of
``backward`` over KD that this control also shows is re-weighting, not auxiliary samples.
``method.direction=random`` moves each input the same length along a random direction (Gaussian,
normalised by the same step rule) instead of the divergence's gradient, with no backward pass: a
gain that this control also shows comes from teacher-labelled points near the data, not from the
direction the backward pass finds. The MNIST-1D table runs both as rows of their own
(``backward-step0``, ``backward-random``).

Logged every step and epoch (as ``train/aux/...``): ``aux/kl_gain`` = mean ``KL`` on the auxiliary
samples / mean ``KL`` on the clean batch, both at T, from the training forward (1 for the control);
``aux/move`` = mean ‖x_aux − x‖ / ‖x‖.

Modes:

* ``online`` (default): fresh auxiliary samples for every batch, from that batch, by the current
  student. Clean and auxiliary samples go through the student in one forward (BatchNorm sees the
  union, as if the auxiliary samples were in the training set).
* ``offline``: every ``regenerate_every`` epochs, in ``on_train_epoch_start``, an auxiliary set is
  generated from the un-augmented training split (``datamodule.train_eval_dataloader()``; a fresh
  random subset of ``offline_size`` samples when > 0) with the student as it is then; the teacher's
  logits on it are cached (the teacher is fixed). ``cumulative=true`` appends each round's samples
  to the set instead of replacing it, so the set grows over rounds ("augmenting the training set").
  Training on "the union" is done by adding, at each step, the λ_aux KL term on the next batch (same
  size as the clean batch) of a permutation of that set. The set is kept on CPU and not
  checkpointed (after a resume it is rebuilt from the current student, one round).

Defaults (``method.space=input``; the keys ``aux_weight``, ``step_size``, ``step_scale`` and ``tie``
left null take the space's defaults, ``Perturbation.defaults``, and text embeddings have their own,
chosen on SST-2: :mod:`kdx.methods.backward_embedding`): α = 0.9, T = 4 (the RepDistiller KD
convention), λ_aux = 1, k = 1, normalized step,
``step_scale=norm`` with η = 0.2 (chosen from measurements on MNIST-1D: at η = 0.2 the auxiliary
divergence is several times the clean one, ``aux/kl_gain`` > 1.3 through training; at
η = 0.05 in input units it was only ×1.06 — docs/methods.md §2 has the figures), ``divergence=kl``, no
clamp, online.

Extending to other inputs: generation is a strategy object behind one boundary,
``Perturbation.__call__(inputs, divergence) -> aux_inputs``, where ``divergence(inputs)`` runs both
models and returns the per-sample ``D`` (differentiable w.r.t. the inputs). ``InputGradientAscent``
perturbs the model input tensor (images, signals, vectors). Another space (e.g. text embeddings)
is a ``Perturbation`` subclass whose ``__init__`` takes the keyword arguments of
:data:`GENERATION_KEYS`, registered with one line, ``PERTURBATIONS["embedding"] = MyPerturbation``,
in its own module under ``kdx/methods/`` (every module there is imported before a config is
composed), and picked with ``method.space``. The loss code and the vision strategy stay untouched.

Deviations from the paper: only the abstract could be read (no official code), so everything
beyond "perturb inputs along the gradient of the teacher–student divergence and augment the
training set" is our choice: the divergence (KL at the distillation temperature T by default),
the step rules and their scale, the projections, the online per-batch generation as default, the
offline schedule (aux batch per step), λ_aux not multiplied by α.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from kdx.context import StepContext
from kdx.errors import KDXError
from kdx.losses import check_kd_weights, kd_loss, per_sample_kl
from kdx.methods.base import (
    DistillationMethod,
    SoftTarget,
    TeacherUse,
    Terms,
    hinton_target,
    register_method,
    train_mode,
)
from kdx.seeding import epoch_rank_seed

log = logging.getLogger(__name__)

Divergence = Callable[[Tensor], Tensor]
STEP_TYPES = ("normalized", "sign")
# token: each token's own norm (method.space=embedding only; see kdx.methods.backward_embedding)
STEP_SCALES = ("norm", "rms", "absolute", "token")
DIVERGENCES = ("kl", "l2")
MODES = ("online", "offline")
# the keyword arguments every Perturbation's __init__ takes (method.* keys of the same names)
GENERATION_KEYS = (
    "steps",
    "step_size",
    "step",
    "step_scale",
    "clamp_min",
    "clamp_max",
    "epsilon",
    "direction",
    "tie",
)
# gradient: ascend D (the method) | random: a random direction of the same length (the control that
# asks whether the gradient's direction matters or any nearby teacher-labelled point would do)
DIRECTIONS = ("gradient", "random")
# auto: the space's own rule (input: both models read the one moved tensor) | student: only the
# student's input moves, the teacher labels the clean input (method.space=embedding only)
TIES = ("auto", "student")


def divergence(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per-sample ``KL(softmax(z_t/T) ‖ softmax(z_s/T))``, shape ``(B,)``, without the T² factor.

    When the two models compute the same function, the gradients through the teacher and through
    the student cancel exactly, so ``∇_x D`` is exactly 0 and the normalized step makes no move.
    """
    return per_sample_kl(student_logits, teacher_logits, temperature)


def l2_divergence(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per-sample ``mean_k (z_s − z_t)_k²``, shape ``(B,)``."""
    return (student_logits - teacher_logits).pow(2).mean(-1)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """``(B,)`` → ``(B, 1, ..., 1)`` broadcastable against ``like``."""
    return values.view(-1, *([1] * (like.dim() - 1)))


class Perturbation:
    """How auxiliary inputs are generated (the strategy boundary; see the module docstring)."""

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Read what the strategy needs from the models (a text variant: the embedding tables)."""

    supports_offline = True  # can build a stored auxiliary set (method.mode=offline)
    # what the method.* keys left null stand for in this space
    defaults: ClassVar[dict[str, Any]] = {
        "aux_weight": 1.0,
        "step_size": 0.2,
        "step_scale": "norm",
        "tie": "auto",
    }

    def __call__(self, inputs: Any, divergence: Divergence) -> Any:
        raise NotImplementedError

    def join(self, inputs: Any, aux_inputs: Any) -> Any:
        """Clean and auxiliary inputs as one batch (clean first), for one forward per model."""
        return torch.cat([inputs, aux_inputs])

    def move_terms(self, inputs: Any, aux_inputs: Any) -> dict[str, Tensor]:
        """How far the auxiliary samples are from the batch (logged under ``aux/``)."""
        return {"aux/move": self.relative_move(inputs, aux_inputs)}

    def refresh(self) -> None:
        """At each training epoch's start: re-read what the strategy measures on the models."""

    def check(self, terms: dict[str, Tensor]) -> None:
        """Once per epoch, on the first batch's terms: warn (or raise KDXError) when the auxiliary
        samples are too far from the data to mean anything."""

    @staticmethod
    def relative_move(inputs: Any, aux_inputs: Any) -> Tensor:
        """Mean ‖x_aux − x‖ / ‖x‖ over the batch (logged as ``aux/move``)."""
        x, x_aux = inputs.detach().flatten(1).float(), aux_inputs.detach().flatten(1).float()
        return ((x_aux - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)).mean()


class InputGradientAscent(Perturbation):
    """``steps`` steps of gradient ascent on ``D`` w.r.t. the model's input tensor."""

    def __init__(
        self,
        steps: int = 1,
        step_size: float = 0.2,
        step: str = "normalized",
        step_scale: str = "norm",
        clamp_min: float | None = None,
        clamp_max: float | None = None,
        epsilon: float | None = None,
        direction: str = "gradient",
        tie: str = "auto",
    ):
        if step_scale == "token":
            raise ValueError(
                "method.step_scale=token normalises the move per token and needs "
                "method.space=embedding; use norm, rms or absolute for input tensors"
            )
        if tie != "auto":
            raise ValueError(
                f"method.tie={tie} chooses which embeddings move and needs method.space=embedding; "
                "leave method.tie=auto for input tensors"
            )
        self.steps = steps
        self.step_size = step_size
        self.step = step
        self.step_scale = step_scale
        self.clamp_min = clamp_min
        self.clamp_max = clamp_max
        self.epsilon = epsilon
        self.random_direction = direction == "random"

    def scale(self, x: Tensor) -> Tensor:
        """Per sample, ``(B, 1, ...)``: what η = 1 stands for — the L2 length ``s`` of a normalized
        step, or the per-coordinate move ``c = s/√n`` of a sign step."""
        flat = x.flatten(1)
        n = flat.shape[1]
        if self.step_scale == "absolute":
            return _per_sample(flat.new_ones(flat.shape[0]), x)
        if self.step_scale == "norm":
            s = flat.norm(dim=1)
        else:
            s = flat.pow(2).mean().sqrt().expand(flat.shape[0]) * n**0.5
        return _per_sample(s / n**0.5 if self.step == "sign" else s, x)

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if callable(getattr(student, "input_embeddings", None)):  # a text model (kdx.models.hf)
            raise KDXError(
                "method.space=input perturbs input tensors, but this student reads token ids; "
                "use method.space=embedding"
            )

    def direction(self, grad: Tensor) -> Tensor:
        """Unit-length (L2) direction, or sign(g) for the sign step; zero for a zero gradient."""
        if self.step == "sign":
            return grad.sign()
        norm = _per_sample(grad.flatten(1).norm(dim=1), grad)
        return torch.where(
            norm > 0, grad / norm.clamp_min(torch.finfo(grad.dtype).tiny), torch.zeros_like(grad)
        )

    def project(self, x_adv: Tensor, x: Tensor, scale: Tensor) -> Tensor:
        if self.epsilon is not None:
            delta = x_adv - x
            if self.step == "sign":
                bound = self.epsilon * scale
                delta = torch.maximum(torch.minimum(delta, bound), -bound)
            else:
                radius = self.epsilon * scale
                norm = _per_sample(delta.flatten(1).norm(dim=1), delta)
                delta = delta * (radius / torch.maximum(norm, radius).clamp_min(torch.finfo(x.dtype).tiny))
            x_adv = x + delta
        if self.clamp_min is not None or self.clamp_max is not None:
            x_adv = x_adv.clamp(self.clamp_min, self.clamp_max)
        return x_adv

    def __call__(self, inputs: Tensor, divergence: Divergence) -> Tensor:
        if not isinstance(inputs, Tensor) or not torch.is_floating_point(inputs):
            raise TypeError(
                "method=backward perturbs the input tensor, but the inputs are "
                f"{getattr(inputs, 'dtype', type(inputs).__name__)}; "
                "discrete inputs (token ids) need an embedding-space Perturbation: method.space=embedding"
            )
        x = inputs.detach()
        if self.step_size == 0:
            return x.clone()  # the control: no move, and no backward pass spent on it
        scale = self.scale(x)
        x_adv = x.clone()
        with torch.enable_grad():
            for _ in range(self.steps):
                if self.random_direction:  # the control: same step rule and length, no backward pass
                    grad = torch.randn_like(x_adv)
                else:
                    x_adv.requires_grad_(True)
                    # autograd.grad w.r.t. the input only: no parameter's .grad is touched
                    (grad,) = torch.autograd.grad(divergence(x_adv).sum(), x_adv, allow_unused=True)
                step = torch.zeros_like(x_adv) if grad is None else self.direction(grad)
                x_adv = self.project(x_adv.detach() + self.step_size * scale * step, x, scale)
        return x_adv.detach()


# method.space -> Perturbation class; other modules add entries (see the module docstring)
PERTURBATIONS: dict[str, type[Perturbation]] = {"input": InputGradientAscent}


@register_method("backward")
class BackwardPassKD(DistillationMethod):
    teacher_use = TeacherUse.LIVE
    live_reason = (
        "it back-propagates through the teacher to its input and reads the teacher on generated "
        "inputs, which no stored output covers"
    )

    def __init__(
        self,
        alpha: float = 0.9,
        temperature: float = 4.0,
        aux_weight: float | None = None,
        steps: int = 1,
        step_size: float | None = None,
        step: str = "normalized",
        step_scale: str | None = None,
        divergence: str = "kl",
        clamp_min: float | None = None,
        clamp_max: float | None = None,
        epsilon: float | None = None,
        mode: str = "online",
        offline_size: int = 0,
        regenerate_every: int = 1,
        cumulative: bool = False,
        space: str = "input",
        direction: str = "gradient",
        tie: str | None = None,
    ):
        super().__init__()
        check_kd_weights(alpha, temperature)
        if space not in PERTURBATIONS:
            raise ValueError(f"method.space={space!r} must be one of {', '.join(PERTURBATIONS)}")
        # null: the space's default (images/vectors and text embeddings need different steps)
        defaults = PERTURBATIONS[space].defaults
        aux_weight = defaults["aux_weight"] if aux_weight is None else aux_weight
        step_size = defaults["step_size"] if step_size is None else step_size
        step_scale = defaults["step_scale"] if step_scale is None else step_scale
        tie = defaults["tie"] if tie is None else tie
        # the record's config holds the nulls: say what they stood for
        log.info(
            "method=backward, space=%s: step_size=%g step_scale=%s tie=%s aux_weight=%g",
            space,
            step_size,
            step_scale,
            tie,
            aux_weight,
        )
        if aux_weight < 0:
            raise ValueError(f"method.aux_weight={aux_weight} must be >= 0")
        if steps < 1:
            raise ValueError(f"method.steps={steps} must be >= 1")
        if step_size < 0:
            raise ValueError(f"method.step_size={step_size} must be >= 0 (0 is the control: no move)")
        if step not in STEP_TYPES:
            raise ValueError(f"method.step={step!r} must be one of {', '.join(STEP_TYPES)}")
        if step_scale not in STEP_SCALES:
            raise ValueError(f"method.step_scale={step_scale!r} must be one of {', '.join(STEP_SCALES)}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"method.divergence={divergence!r} must be one of {', '.join(DIVERGENCES)}")
        if epsilon is not None and epsilon <= 0:
            raise ValueError(f"method.epsilon={epsilon} must be > 0 (or null for no ε-ball)")
        if clamp_min is not None and clamp_max is not None and clamp_min > clamp_max:
            raise ValueError(f"method.clamp_min={clamp_min} > method.clamp_max={clamp_max}")
        if mode not in MODES:
            raise ValueError(f"method.mode={mode!r} must be one of {', '.join(MODES)}")
        if offline_size < 0:
            raise ValueError(f"method.offline_size={offline_size} must be >= 0 (0: the whole training split)")
        if regenerate_every < 1:
            raise ValueError(f"method.regenerate_every={regenerate_every} must be >= 1 (epochs)")
        if cumulative and mode != "offline":
            raise ValueError(
                "method.cumulative=true grows the offline auxiliary set: set method.mode=offline"
            )
        if direction not in DIRECTIONS:
            raise ValueError(f"method.direction={direction!r} must be one of {', '.join(DIRECTIONS)}")
        if tie not in TIES:
            raise ValueError(f"method.tie={tie!r} must be one of {', '.join(TIES)}")
        if mode == "offline" and not PERTURBATIONS[space].supports_offline:
            raise ValueError(f"method.space={space} generates online only; use method.mode=online")
        self.alpha = alpha
        self.temperature = temperature
        self.aux_weight = aux_weight
        self.divergence = divergence
        self.mode = mode
        self.offline_size = offline_size
        self.regenerate_every = regenerate_every
        self.cumulative = cumulative
        self.perturb: Perturbation = PERTURBATIONS[space](
            steps=steps,
            step_size=step_size,
            step=step,
            step_scale=step_scale,
            clamp_min=clamp_min,
            clamp_max=clamp_max,
            epsilon=epsilon,
            direction=direction,
            tie=tie,
        )
        self._check_pending = True  # the guard reads the first online batch of each epoch
        # offline auxiliary set (CPU): inputs, cached teacher logits, and the draw order
        self._aux_x: Tensor | None = None
        self._aux_teacher: Tensor | None = None
        self._aux_order: Tensor | None = None
        self._aux_cursor = 0
        self._aux_rng: torch.Generator | None = None

    def setup(self, student: nn.Module, teacher: nn.Module | None, datamodule: Any) -> None:
        self.perturb.setup(student, teacher)

    def soft_target(self) -> SoftTarget:
        return SoftTarget(self.temperature, hinton_target(self.temperature))

    # -- generation ---------------------------------------------------------------------------
    def sample_divergence(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        """The per-sample ``D`` that generation ascends (``method.divergence``)."""
        if self.divergence == "l2":
            return l2_divergence(student_logits, teacher_logits)
        return divergence(student_logits, teacher_logits, self.temperature)

    def generate(self, ctx: StepContext, x: Tensor) -> Tensor:
        """Auxiliary inputs for ``x``: the teacher's parameters stay frozen, the student's get no
        gradient, and both models' BatchNorm statistics and modes are left as they were."""

        def d(inputs: Tensor) -> Tensor:
            z_s = ctx.student(inputs, self.reads).logits
            z_t = ctx.teacher(inputs, self.reads).logits
            return self.sample_divergence(z_s, z_t)

        with train_mode(ctx.student, False), train_mode(ctx.teacher, False):
            return self.perturb(x, d)

    # -- the step -----------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], ctx: StepContext) -> Terms:
        x, y, _ = batch
        if self.mode == "offline":
            x_aux, teacher_aux = self._next_aux_batch(ctx, x.shape[0])
            x_aux = x_aux.to(x.device, non_blocking=True)
            with torch.no_grad():
                teacher_clean = ctx.teacher(x, self.reads).logits
            teacher_aux = teacher_aux.to(x.device, teacher_clean.dtype, non_blocking=True)
            teacher_logits = torch.cat([teacher_clean, teacher_aux])
        else:
            x_aux = self.generate(ctx, x)
            with torch.no_grad():
                teacher_logits = ctx.teacher(self.perturb.join(x, x_aux), self.reads).logits
        student_logits = ctx.student(self.perturb.join(x, x_aux), self.reads).logits
        n = y.shape[0]  # x may be a mapping of tensors (text)
        terms = self.terms(student_logits[:n], teacher_logits[:n], y, student_logits[n:], teacher_logits[n:])
        if self.mode == "online":
            terms.update(self.perturb.move_terms(x, x_aux))
            if self._check_pending:
                self._check_pending = False
                self.perturb.check(terms)
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
        # KL is T²·KL / T², so the ratio of the two batchmean terms is the ratio of mean KLs
        gain = aux_kd.detach() / kd.detach().clamp_min(torch.finfo(kd.dtype).tiny)
        return {"loss": loss, "ce": ce, "kd": kd, "aux_kd": aux_kd, "aux/kl_gain": gain}

    # -- offline mode -------------------------------------------------------------------------
    def on_train_epoch_start(self, ctx: StepContext) -> None:
        self._check_pending = True
        self.perturb.refresh()
        if self.mode != "offline":
            return
        if self._aux_x is None or ctx.epoch % self.regenerate_every == 0:
            self.build_aux_set(ctx)

    def build_aux_set(self, ctx: StepContext) -> None:
        """Generate a round of auxiliary samples from the un-augmented training split; it replaces
        the set, or is appended to it with ``cumulative``."""
        if ctx.datamodule is None:
            raise RuntimeError("method.mode=offline needs a kdx data module (train_eval_dataloader())")
        loader: DataLoader = ctx.datamodule.train_eval_dataloader()
        self._aux_rng = self._generator(ctx)
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
        device = ctx.device
        xs, zs = [], []
        for batch in loader:
            x = move_data_to_device(batch[0], device)
            x_aux = self.generate(ctx, x)
            with torch.no_grad(), train_mode(ctx.teacher, False):
                zs.append(ctx.teacher(x_aux, self.reads).logits.float().cpu())
            xs.append(x_aux.cpu())
        new_x, new_z = torch.cat(xs), torch.cat(zs)
        if self.cumulative and self._aux_x is not None:
            new_x, new_z = torch.cat([self._aux_x, new_x]), torch.cat([self._aux_teacher, new_z])
        self._aux_x, self._aux_teacher = new_x, new_z
        self._aux_order = torch.randperm(len(self._aux_x), generator=self._aux_rng)
        self._aux_cursor = 0
        log.info(
            "method=backward: %d auxiliary samples at epoch %d",
            len(self._aux_x),
            ctx.epoch,
        )

    def _generator(self, ctx: StepContext) -> torch.Generator:
        """Reproducible per (run seed, epoch, rank): independent of how much global RNG was used,
        and different on each DDP rank."""
        seed = epoch_rank_seed(torch.initial_seed(), ctx.epoch, ctx.rank)
        return torch.Generator().manual_seed(seed)

    def _next_aux_batch(self, ctx: StepContext, size: int) -> tuple[Tensor, Tensor]:
        if self._aux_x is None:  # the epoch hook did not run (e.g. the method is driven by hand)
            self.build_aux_set(ctx)
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
