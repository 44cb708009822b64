"""``rdim``: Guo, He, Li, Qin, Pham, Zhang & Liu, *RdimKD: Generic Distillation Paradigm by
Dimensionality Reduction* (arXiv 2312.08700; no official code found). See docs/methods.md §4.

A plain L2 feature loss, taken in a d-dimensional subspace of the teacher's feature space:
the teacher feature ``X_t`` and the adapted student feature ``A(X_s)`` are projected by the same
fixed ``K`` (C_t × d, d ≪ C_t) and compared there::

    L_rdim,i = mean over (N, d) of ((z(A_i(X_s,i)) − z(X_t,i)) K_i)²     X as token matrices (N = B·H·W, C)
    L = ce_weight·CE + Σ_i weight_i·L_rdim,i [+ kd_weight·T²·KL(p_t ‖ p_s)]

over a list of stages ``i`` (default: the last stage only). ``z`` is the identity, or with
``standardize=true`` the per-channel standardisation with the *teacher's* mean and std,
``z(X) = (X − μ_t)/σ_t``, applied to both sides alike — so a student whose adapted feature equals
the teacher's has loss 0 under every option. Only the d directions of ``K`` are constrained; the
student is free in the complement.

``projection``:

* ``random``: ``K`` = Q of the QR decomposition of a seeded Gaussian (C_t × d), signs fixed by
  diag(R) so ``K`` is Haar-distributed; ``KᵀK = I``. No data needed.
* ``pca``: the top-d principal directions of the (standardised, with ``standardize``) teacher
  features, each signed so its largest-magnitude entry is positive.
* ``ae``: an autoencoder fitted on (a subsample of, ``ae_max_tokens``) the (standardised) teacher
  features for ``ae_epochs`` epochs; its encoder is the projection. Linear (``ae_hidden=0``): ``K``
  spans the encoder's row space, orthonormalised by QR so ``KᵀK = I`` as for the other two.
  Non-linear (``ae_hidden>0``, Linear-ReLU-Linear): ``L = mean (enc(z(A(X_s))) − enc(z(X_t)))²``.

What is fitted on what: ``μ_t``, ``σ_t`` (with ``standardize``), the PCA covariance and the AE are
fitted once, at the start of fit (``on_fit_start``; after a resume they come from the checkpoint),
on the *teacher's* features of the training split *without augmentation*
(``datamodule.train_eval_dataloader()``, the first ``fit_batches`` batches), with the teacher in
``eval()`` and under a forked RNG (the student's training randomness does not depend on the fit).
Nothing is fitted on student features or on validation/test data. ``random`` with
``standardize=false`` needs no data. ``X_t`` never carries a gradient.

Features: ``feature=stage`` reads stage maps as the zoo returns them — the output of each stage,
*after* its final activation (post-activation; the kdx zoo exposes no pre-activation features, so
there is no switch); ``feature=embedding`` reads the penultimate (pooled) features. ``stages`` is a
list of ``{index, dim, dim_ratio, weight}`` (missing keys take the top-level ``dim``, ``dim_ratio``
and ``weight``); ``null`` means one stage, ``stage_index``. ``dim`` sets d, else
``d = round(dim_ratio · C_t)``. Each stage has its own adapter ``A_i``
(:class:`~kdx.methods.connectors.Connector`, sized by probing in ``setup``, learned with the
student: ``nn.Linear`` for embeddings, a 1×1 conv for stage maps, the identity when the widths
agree; a spatial mismatch is resolved by adaptive average pooling (student larger) or interpolation
(student smaller); a vector against a map pools both to vectors), its own ``K_i`` (seed
``seed + i``) and its own statistics.

Defaults: projection=random, feature=stage, the last stage, dim_ratio=0.25, weight=1,
standardize=false, CE weight 1, no KD term.

Deviations from the paper: we could read only the abstract, so everything below the abstract's
"project both feature maps with one projection matrix onto a low-dimensional subspace, L2 there"
is our choice, unverified: the mean reduction over tokens × d, the default d/C_t = 1/4 and weight 1,
distilling the last stage by default (the paper distils several stages, on detection and
segmentation too; ``stages`` lists them), the adapter design, fitting PCA/AE once at the start of
training on clean training data rather than offline, orthonormalising the linear AE's encoder, the
AE recipe (Adam, lr 1e-2, batch 256, 10 epochs, ≤ 50 000 tokens), the optional standardisation,
and the optional KD term.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn

from kdx.context import StepContext
from kdx.distributed import distributed
from kdx.losses import kd_loss
from kdx.methods.base import DistillationMethod, SoftTarget, Terms, hinton_target, register_method, train_mode
from kdx.methods.buffers import LazyBuffers
from kdx.methods.connectors import Connector, to_tokens
from kdx.models.base import EMBEDDING, LOGITS, STAGES, ModelOutput

PROJECTIONS = ("random", "pca", "ae")
FEATURES = ("stage", "embedding")


# ---------------------------------------------------------------------------------------------
# Projections.


def _sign_fix(basis: Tensor) -> Tensor:
    """Sign each column so its largest-magnitude entry is positive (a deterministic choice)."""
    idx = basis.abs().argmax(0)
    signs = torch.sign(basis[idx, torch.arange(basis.shape[1], device=basis.device)])
    return basis * torch.where(signs == 0, torch.ones_like(signs), signs)


def orthonormal_basis(matrix: Tensor) -> Tensor:
    """Orthonormal basis (C × d) of the column space of ``matrix`` (C × d, full column rank)."""
    q, r = torch.linalg.qr(matrix.double())
    diag = torch.sign(torch.diagonal(r))
    return q * torch.where(diag == 0, torch.ones_like(diag), diag)


def random_orthogonal(channels: int, dim: int, seed: int = 0) -> Tensor:
    """A Haar-random ``(channels, dim)`` matrix with orthonormal columns, from a seeded Gaussian."""
    if not 1 <= dim <= channels:
        raise ValueError(f"projection dim {dim} must lie in [1, {channels}]")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(channels, dim, generator=generator, dtype=torch.float64)
    return orthonormal_basis(gaussian).float()


class StreamingMoments:
    """Mean and covariance of a stream of ``(N, C)`` batches, in float64, shifted by the first batch's
    mean for accuracy; memory O(C²) whatever the number of rows."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: Tensor | None = None
        self.sum: Tensor | None = None
        self.outer: Tensor | None = None

    def update(self, x: Tensor) -> None:
        x = x.detach().double()
        if self.shift is None:
            self.shift = x.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = x.new_zeros(x.shape[1], x.shape[1])
        xc = x - self.shift
        self.n += x.shape[0]
        self.sum += xc.sum(0)
        self.outer += xc.t() @ xc

    def mean(self) -> Tensor:
        return self.shift + self.sum / self.n

    def covariance(self) -> Tensor:
        """Unbiased (n − 1) covariance, as scikit-learn's PCA uses."""
        if self.n < 2:
            raise ValueError("need at least two feature vectors to fit a covariance")
        m = self.sum / self.n
        return (self.outer - self.n * torch.outer(m, m)) / (self.n - 1)


def pca_directions(covariance: Tensor, dim: int) -> Tensor:
    """The top-``dim`` eigenvectors of a covariance, as columns (C × dim), by decreasing variance."""
    if not 1 <= dim <= covariance.shape[0]:
        raise ValueError(f"projection dim {dim} must lie in [1, {covariance.shape[0]}]")
    _, vectors = torch.linalg.eigh(covariance.double())
    return _sign_fix(vectors[:, -dim:].flip(1)).float()


def rdim_loss(student_tokens: Tensor, teacher_tokens: Tensor, projection: Tensor) -> Tensor:
    """``mean over (N, d) of ((X_s − X_t) K)²``; the teacher side is detached."""
    diff = student_tokens - teacher_tokens.detach()
    return (diff @ projection.to(diff.dtype)).pow(2).mean()


def fit_autoencoder(
    tokens: Tensor,
    dim: int,
    hidden: int = 0,
    epochs: int = 10,
    lr: float = 1e-2,
    batch_size: int = 256,
    seed: int = 0,
) -> nn.Sequential:
    """Train an autoencoder ``C → (hidden →) dim → (hidden →) C`` with MSE on ``tokens`` (M × C);
    returns the encoder. Self-contained randomness (``seed``)."""
    channels = tokens.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hidden > 0:
            encoder = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, dim))
            decoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        else:
            encoder, decoder = (
                nn.Sequential(nn.Linear(channels, dim)),
                nn.Sequential(nn.Linear(dim, channels)),
            )
    encoder.to(tokens.device), decoder.to(tokens.device)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(tokens.shape[0], generator=generator).to(tokens.device)
            for start in range(0, tokens.shape[0], batch_size):
                x = tokens[order[start : start + batch_size]]
                loss = F.mse_loss(decoder(encoder(x)), x)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return encoder.requires_grad_(False).eval()


# ---------------------------------------------------------------------------------------------
# One distilled stage: its adapter, projection and teacher statistics.


class RdimStage(LazyBuffers, nn.Module):
    """The state of one distilled feature: adapter ``A``, ``K`` (or the AE encoder), ``μ_t``, ``σ_t``."""

    def __init__(self, index: int, dim: int | None, dim_ratio: float, weight: float):
        super().__init__()
        self.index, self.dim, self.dim_ratio, self.weight = index, dim, dim_ratio, weight
        self.connector: Connector | None = None  # built in setup, from probed shapes
        # Sized in setup; LazyBuffers resizes them when a checkpoint loads.
        self.register_buffer("projection_matrix", torch.zeros(0, 0))  # K (C_t × d); linear projections
        for name in ("ae_w1", "ae_b1", "ae_w2", "ae_b2"):  # non-linear AE encoder
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("teacher_mean", torch.zeros(0))
        self.register_buffer("teacher_scale", torch.zeros(0))
        self.register_buffer("fitted", torch.tensor(False))
        self._fitted = False  # a Python mirror of `fitted`: no device sync per step

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._fitted = bool(self.fitted)

    def mark_fitted(self, value: bool) -> None:
        self.fitted.fill_(value)
        self._fitted = value

    def resolve_dim(self, channels: int) -> int:
        dim = self.dim if self.dim is not None else max(1, int(round(self.dim_ratio * channels)))
        if dim > channels:
            raise ValueError(f"method.dim={dim} exceeds the teacher feature width {channels}")
        return dim


@register_method("rdim")
class RdimKD(DistillationMethod):
    reads = frozenset({LOGITS, STAGES})

    def __init__(
        self,
        projection: str = "random",
        feature: str = "stage",
        stage_index: int = -1,
        stages: list[Any] | None = None,
        dim: int | None = None,
        dim_ratio: float = 0.25,
        weight: float = 1.0,
        standardize: bool = False,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
        seed: int = 0,
        fit_batches: int | None = None,
        ae_epochs: int = 10,
        ae_hidden: int = 0,
        ae_lr: float = 1e-2,
        ae_max_tokens: int = 50_000,
    ):
        super().__init__()
        if projection not in PROJECTIONS:
            raise ValueError(f"method.projection={projection!r} must be one of {', '.join(PROJECTIONS)}")
        if feature not in FEATURES:
            raise ValueError(f"method.feature={feature!r} must be one of {', '.join(FEATURES)}")
        if ce_weight < 0 or kd_weight < 0:
            raise ValueError("method.ce_weight and method.kd_weight must be >= 0")
        if temperature <= 0:
            raise ValueError(f"method.temperature={temperature} must be > 0")
        if fit_batches is not None and fit_batches < 1:
            raise ValueError(f"method.fit_batches={fit_batches} must be >= 1 (or null for the whole split)")
        if ae_epochs < 1 or ae_hidden < 0 or ae_max_tokens < 2 or ae_lr <= 0:
            raise ValueError(
                "method.ae_epochs >= 1, ae_hidden >= 0, ae_max_tokens >= 2 and ae_lr > 0 required"
            )
        if stages is not None and feature == "embedding":
            raise ValueError("method.stages lists stage maps; with method.feature=embedding leave it null")
        specs = [{"index": stage_index}] if stages is None else [dict(spec) for spec in stages]
        if not specs:
            raise ValueError(
                "method.stages is empty: list at least one {index: ...} (or null: the last stage)"
            )
        parts = []
        for spec in specs:
            unknown = set(spec) - {"index", "dim", "dim_ratio", "weight"}
            if unknown or "index" not in spec:
                raise ValueError(
                    f"method.stages entry {spec}: give index (and optionally dim, dim_ratio, weight); "
                    f"unknown keys: {sorted(unknown)}"
                )
            s_dim, s_ratio, s_weight = (
                spec.get("dim", dim),
                spec.get("dim_ratio", dim_ratio),
                spec.get("weight", weight),
            )
            if s_dim is not None and s_dim < 1:
                raise ValueError(f"method.dim={s_dim} must be >= 1 (or null to use method.dim_ratio)")
            if s_dim is None and not 0.0 < s_ratio <= 1.0:
                raise ValueError(f"method.dim_ratio={s_ratio} must lie in (0, 1]")
            if s_weight < 0:
                raise ValueError(f"method.weight={s_weight} must be >= 0")
            parts.append(RdimStage(int(spec["index"]), s_dim, float(s_ratio), float(s_weight)))
        self.parts = nn.ModuleList(parts)
        self.projection, self.feature = projection, feature
        self.standardize = standardize
        self.ce_weight, self.kd_weight, self.temperature, self.seed = ce_weight, kd_weight, temperature, seed
        self.fit_batches = fit_batches
        self.ae_epochs, self.ae_hidden, self.ae_lr, self.ae_max_tokens = (
            ae_epochs,
            ae_hidden,
            ae_lr,
            ae_max_tokens,
        )
        self.reads = frozenset({LOGITS, STAGES if feature == "stage" else EMBEDDING})
        self._datamodule: Any = None

    @property
    def _fitted(self) -> bool:
        return all(part._fitted for part in self.parts)

    def soft_target(self) -> SoftTarget | None:
        return SoftTarget(self.temperature, hinton_target(self.temperature)) if self.kd_weight > 0 else None

    # -- features ------------------------------------------------------------------------------
    def select(self, out: ModelOutput, who: str, part: RdimStage) -> Tensor:
        """The feature this method distils from a model's output at ``part``'s stage."""
        if self.feature == "embedding":
            if out.embedding is None:
                raise RuntimeError(f"rdim: the {who} returned no embedding")
            return out.embedding
        if not out.stages:
            raise RuntimeError(
                f"rdim: the {who} returned no stages; give it stage_names (foreign models) "
                "or use method.feature=embedding"
            )
        index = part.index
        try:
            return out.stages[index]
        except IndexError:
            raise IndexError(
                f"rdim: method stage index {index} but the {who} has {len(out.stages)} stages"
            ) from None

    @property
    def nonlinear(self) -> bool:
        return self.projection == "ae" and self.ae_hidden > 0

    def standardized(self, tokens: Tensor, part: RdimStage) -> Tensor:
        """``z(X) = (X − μ_t)/σ_t`` with ``standardize``, else ``X``; the same map for both sides."""
        if not self.standardize:
            return tokens
        return (tokens - part.teacher_mean.to(tokens.dtype)) / part.teacher_scale.to(tokens.dtype)

    def project(self, tokens: Tensor, part: RdimStage) -> Tensor:
        """``(N, C_t) → (N, d)``: ``X K``, or the non-linear AE encoder."""
        if self.nonlinear:
            hidden = F.relu(F.linear(tokens, part.ae_w1.to(tokens.dtype), part.ae_b1.to(tokens.dtype)))
            return F.linear(hidden, part.ae_w2.to(tokens.dtype), part.ae_b2.to(tokens.dtype))
        return tokens @ part.projection_matrix.to(tokens.dtype)

    def student_tokens(self, student_feature: Tensor, part: RdimStage) -> Tensor:
        assert part.connector is not None
        return self.standardized(to_tokens(part.connector(student_feature)), part)

    def teacher_target(self, teacher_feature: Tensor, part: RdimStage) -> Tensor:
        """Teacher feature → the token matrix the adapted student is compared with (detached)."""
        assert part.connector is not None
        return self.standardized(to_tokens(part.connector.teacher(teacher_feature.detach())), part)

    # -- lifecycle -----------------------------------------------------------------------------
    def setup(self, student: Any, teacher: Any, datamodule: Any) -> None:
        input_shape = None if datamodule is None else datamodule.input_shape
        if teacher is None:
            raise ValueError("rdim needs a teacher")
        if input_shape is None:
            raise ValueError(
                "rdim sizes its adapter by probing the models: setup() needs a datamodule with an input_shape"
            )
        self._datamodule = datamodule
        s_out = student.probe(tuple(input_shape), self.reads)
        t_out = teacher.probe(tuple(input_shape), self.reads)
        for i, part in enumerate(self.parts):
            s, t = self.select(s_out, "student", part), self.select(t_out, "teacher", part)
            connector = Connector(s.shape[1:], t.shape[1:])
            if part.connector is None or (part.connector.student_shape, part.connector.teacher_shape) != (
                connector.student_shape,
                connector.teacher_shape,
            ):
                part.connector = connector.to(s.device)
            channels = part.connector.out_channels
            dim = part.resolve_dim(channels)
            if tuple(part.projection_matrix.shape) != (channels, dim):
                part.projection_matrix = torch.zeros(channels, dim, device=part.fitted.device)
                part.mark_fitted(False)
            if self.projection == "random" and not self.standardize and not part._fitted:
                part.projection_matrix.copy_(random_orthogonal(channels, dim, self.seed + i))
                part.mark_fitted(True)  # needs no data

    def on_fit_start(self, ctx: StepContext) -> None:
        if self._fitted:
            return  # fitted earlier or restored from a checkpoint
        datamodule = self._datamodule or ctx.datamodule
        if datamodule is None:
            raise ValueError("rdim fits its projection on the training split: it needs a datamodule")
        self.fit(ctx.teacher, datamodule.train_eval_dataloader(), ctx.device)

    @torch.no_grad()
    def fit(self, teacher: Any, loader: Any, device: torch.device | str | None = None) -> None:
        """Fit each stage's teacher statistics and projection on the teacher's features over ``loader``
        (the un-augmented training split; see the module docstring)."""
        if any(part.connector is None for part in self.parts):
            raise RuntimeError("rdim: call setup() before fit()")
        device = torch.device(device) if device is not None else self.parts[0].fitted.device
        needs_data = self.standardize or self.projection != "random"
        moments = [StreamingMoments() for _ in self.parts]
        samples: list[list[Tensor]] = [[] for _ in self.parts]
        if needs_data:
            n_batches = len(loader) if self.fit_batches is None else min(len(loader), self.fit_batches)
            per_batch = math.ceil(self.ae_max_tokens / max(1, n_batches))
            generator = torch.Generator().manual_seed(self.seed)
            # eval(): the teacher's BN statistics must not move
            with (
                train_mode(teacher, False),
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            ):
                for b, (x, *_) in enumerate(loader):
                    if b >= n_batches:
                        break
                    out = teacher(move_data_to_device(x, device), self.reads)  # x may be a mapping (text)
                    for i, part in enumerate(self.parts):
                        tokens = to_tokens(part.connector.teacher(self.select(out, "teacher", part))).double()
                        moments[i].update(tokens)
                        if self.projection == "ae":
                            keep = torch.randperm(tokens.shape[0], generator=generator)[:per_batch]
                            samples[i].append(tokens[keep.to(tokens.device)].float())
        for i, part in enumerate(self.parts):
            self._fit_part(i, part, moments[i], samples[i], needs_data)
        self._broadcast()

    def _fit_part(
        self, i: int, part: RdimStage, moments: StreamingMoments, samples: list[Tensor], needs_data: bool
    ) -> None:
        channels, dim = part.projection_matrix.shape
        seed = self.seed + i
        target = part.fitted.device
        cov = None
        if needs_data:
            mean, cov = moments.mean(), moments.covariance()
            scale = cov.diagonal().clamp_min(1e-12).sqrt()
            if self.standardize:
                part.teacher_mean = mean.float().to(target)
                part.teacher_scale = scale.float().to(target)
                cov = cov / torch.outer(scale, scale)  # the covariance of the standardised features
        if self.projection == "random":
            basis = random_orthogonal(channels, dim, seed)
        elif self.projection == "pca":
            basis = pca_directions(cov, dim)
        else:
            tokens = self.standardized(torch.cat(samples).to(target), part)
            encoder = fit_autoencoder(tokens, dim, self.ae_hidden, self.ae_epochs, self.ae_lr, seed=seed)
            if self.nonlinear:
                first, last = encoder[0], encoder[2]
                part.ae_w1, part.ae_b1 = first.weight.detach().clone(), first.bias.detach().clone()
                part.ae_w2, part.ae_b2 = last.weight.detach().clone(), last.bias.detach().clone()
                basis = torch.zeros(channels, dim)
            else:
                basis = _sign_fix(orthonormal_basis(encoder[0].weight.detach().t())).float()
        part.projection_matrix.copy_(basis.to(part.projection_matrix))
        for name in ("ae_w1", "ae_b1", "ae_w2", "ae_b2"):
            setattr(part, name, getattr(part, name).to(target))
        part.mark_fitted(True)

    def _broadcast(self) -> None:
        if not distributed():  # every rank fitted on the same data; make the buffers bit-identical anyway
            return
        for part in self.parts:
            for name in (
                "projection_matrix",
                "teacher_mean",
                "teacher_scale",
                "ae_w1",
                "ae_b1",
                "ae_w2",
                "ae_b2",
            ):
                buf = getattr(part, name)
                if buf.numel():
                    torch.distributed.broadcast(buf, src=0)

    # -- loss ----------------------------------------------------------------------------------
    def stage_loss(self, student: ModelOutput, teacher: ModelOutput, part: RdimStage) -> Tensor:
        student_tokens = self.student_tokens(self.select(student, "student", part), part)
        teacher_tokens = self.teacher_target(self.select(teacher, "teacher", part), part)
        if self.nonlinear:
            return (
                (self.project(student_tokens, part) - self.project(teacher_tokens, part).detach())
                .pow(2)
                .mean()
            )
        return rdim_loss(student_tokens, teacher_tokens, part.projection_matrix)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, y: Tensor, index: Tensor) -> Terms:
        if not self._fitted or any(part.connector is None for part in self.parts):
            raise RuntimeError(
                "rdim: the projection is not fitted; the module calls setup() and "
                "on_fit_start(); outside Lightning call method.setup(...) and method.fit(...)"
            )
        ce = F.cross_entropy(student.logits, y)
        per_stage = [self.stage_loss(student, teacher, part) for part in self.parts]
        rdim = sum(part.weight * value for part, value in zip(self.parts, per_stage))
        terms = {"ce": ce, "rdim": rdim}
        if len(per_stage) > 1:
            terms |= {f"rdim/{part.index}": value.detach() for part, value in zip(self.parts, per_stage)}
        loss = self.ce_weight * ce + rdim
        if self.kd_weight > 0:
            terms["kd"] = kd_loss(student.logits, teacher.logits, self.temperature)
            loss = loss + self.kd_weight * terms["kd"]
        terms["loss"] = loss
        return terms
