"""``rdim``: Guo, He, Li, Qin, Pham, Zhang & Liu, *RdimKD: Generic Distillation Paradigm by
Dimensionality Reduction* (arXiv 2312.08700; no official code found).

A plain L2 feature loss, taken in a d-dimensional subspace of the teacher's feature space:
the teacher feature ``X_t`` and the adapted student feature ``A(X_s)`` are projected by the same
fixed ``K`` (C_t × d, d ≪ C_t) and compared there::

    L_rdim = mean over (N, d) of ((A(X_s) − X_t) K)²           X as token matrices (N = B·H·W, C)
    L = ce_weight·CE + weight·L_rdim [+ kd_weight·T²·KL(p_t ‖ p_s)]

Only the d directions of ``K`` are constrained; the student is free in the complement.
``projection``:

* ``random``: ``K`` = Q of the QR decomposition of a seeded Gaussian (C_t × d), signs fixed by
  diag(R) so ``K`` is Haar-distributed; ``KᵀK = I``. No data needed.
* ``pca``: the top-d principal directions of the teacher features over the training set
  (``datamodule.train_eval_dataloader()``; covariance of the centred features accumulated in
  float64, then ``eigh``), each signed so its largest-magnitude entry is positive.
* ``ae``: an autoencoder fitted on (a subsample of, ``ae_max_tokens``) the teacher features for
  ``ae_epochs`` epochs; its encoder is the projection. Linear (``ae_hidden=0``): ``K`` spans the
  encoder's row space, orthonormalised by QR so ``KᵀK = I`` as for the other two. Non-linear
  (``ae_hidden>0``, Linear-ReLU-Linear): ``L = mean (enc(A(X_s)) − enc(X_t))²``.

``K``, the encoder, and the teacher statistics are buffers fitted once, at the start of fit
(after a resume they come from the checkpoint); the fit runs under a forked RNG, so the student's
training randomness does not depend on the projection. ``X_t`` never carries a gradient.
The student adapter ``A`` (:class:`~kdx.methods.connectors.Connector`, sized by probing in
``setup``) is learned with the student: ``nn.Linear`` for embeddings, a 1×1 conv for stage maps,
the identity when the widths agree; a spatial mismatch is resolved by adaptive average pooling
(student larger) or interpolation (student smaller); a vector against a map pools both to vectors.
``feature=stage`` reads ``stages[stage_index]`` (default −1, the last stage); ``feature=embedding``
reads the penultimate features. ``dim`` sets d, else ``d = round(dim_ratio · C_t)``.
``standardize=True`` compares in the space of per-channel standardised teacher features (mean and
std fitted with ``K``); it makes ``weight`` less scale-dependent.

Defaults: projection=random, feature=stage, stage_index=−1, dim_ratio=0.25, weight=1,
standardize=false, CE weight 1, no KD term.

Deviations from the paper: we could read only the abstract, so everything below the abstract's
"project both feature maps with one projection matrix onto a low-dimensional subspace, L2 there"
is our choice, unverified: the mean reduction over tokens × d, the default d/C_t = 1/4 and weight 1,
distilling one stage (the last) rather than several, the adapter design (1×1 conv / linear with
bias, identity when widths agree, pool-or-interpolate resize, global pooling on a rank mismatch),
fitting PCA/AE once before training on the (augmented) training split rather than offline on clean
data, orthonormalising the linear AE's encoder, the AE recipe (Adam, lr 1e-2, batch 256, 10 epochs,
≤ 50 000 tokens), the optional standardisation, and the optional KD term.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdx.methods.base import DistillationMethod, Terms, kd_loss, register_method
from kdx.methods.connectors import Connector, LazyBuffers, distributed, to_tokens
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
# The method.


@register_method("rdim")
class RdimKD(LazyBuffers, DistillationMethod):
    reads = frozenset({LOGITS, STAGES})

    def __init__(
        self,
        projection: str = "random",
        feature: str = "stage",
        stage_index: int = -1,
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
        if dim is not None and dim < 1:
            raise ValueError(f"method.dim={dim} must be >= 1 (or null to use method.dim_ratio)")
        if dim is None and not 0.0 < dim_ratio <= 1.0:
            raise ValueError(f"method.dim_ratio={dim_ratio} must lie in (0, 1]")
        if weight < 0 or ce_weight < 0 or kd_weight < 0:
            raise ValueError("method.weight, method.ce_weight and method.kd_weight must be >= 0")
        if temperature <= 0:
            raise ValueError(f"method.temperature={temperature} must be > 0")
        if fit_batches is not None and fit_batches < 1:
            raise ValueError(f"method.fit_batches={fit_batches} must be >= 1 (or null for the whole split)")
        if ae_epochs < 1 or ae_hidden < 0 or ae_max_tokens < 2 or ae_lr <= 0:
            raise ValueError(
                "method.ae_epochs >= 1, ae_hidden >= 0, ae_max_tokens >= 2 and ae_lr > 0 required"
            )
        self.projection, self.feature, self.stage_index = projection, feature, stage_index
        self.dim, self.dim_ratio, self.weight, self.standardize = dim, dim_ratio, weight, standardize
        self.ce_weight, self.kd_weight, self.temperature, self.seed = ce_weight, kd_weight, temperature, seed
        self.fit_batches = fit_batches
        self.ae_epochs, self.ae_hidden, self.ae_lr, self.ae_max_tokens = (
            ae_epochs,
            ae_hidden,
            ae_lr,
            ae_max_tokens,
        )
        self.reads = frozenset({LOGITS, STAGES if feature == "stage" else EMBEDDING})
        self.connector: Connector | None = None  # built in setup, from probed shapes
        self._datamodule: Any = None
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

    def _mark_fitted(self, value: bool) -> None:
        self.fitted.fill_(value)
        self._fitted = value

    # -- features ------------------------------------------------------------------------------
    def select(self, out: ModelOutput, who: str = "model") -> Tensor:
        """The feature this method distils from a model's output."""
        if self.feature == "embedding":
            if out.embedding is None:
                raise RuntimeError(f"rdim: the {who} returned no embedding")
            return out.embedding
        if not out.stages:
            raise RuntimeError(
                f"rdim: the {who} returned no stages; give it stage_names (foreign models) "
                "or use method.feature=embedding"
            )
        try:
            return out.stages[self.stage_index]
        except IndexError:
            raise IndexError(
                f"rdim: method.stage_index={self.stage_index} but the {who} has {len(out.stages)} stages"
            ) from None

    def resolve_dim(self, channels: int) -> int:
        dim = self.dim if self.dim is not None else max(1, int(round(self.dim_ratio * channels)))
        if dim > channels:
            raise ValueError(f"method.dim={dim} exceeds the teacher feature width {channels}")
        return dim

    @property
    def nonlinear(self) -> bool:
        return self.projection == "ae" and self.ae_hidden > 0

    def project(self, tokens: Tensor) -> Tensor:
        """``(N, C_t) → (N, d)``: ``X K``, or the non-linear AE encoder."""
        if self.nonlinear:
            hidden = F.relu(F.linear(tokens, self.ae_w1.to(tokens.dtype), self.ae_b1.to(tokens.dtype)))
            return F.linear(hidden, self.ae_w2.to(tokens.dtype), self.ae_b2.to(tokens.dtype))
        return tokens @ self.projection_matrix.to(tokens.dtype)

    def teacher_target(self, teacher_feature: Tensor) -> Tensor:
        """Teacher feature → the token matrix the adapted student is compared with (detached)."""
        assert self.connector is not None
        tokens = to_tokens(self.connector.teacher(teacher_feature.detach()))
        if self.standardize:
            tokens = (tokens - self.teacher_mean.to(tokens.dtype)) / self.teacher_scale.to(tokens.dtype)
        return tokens

    # -- lifecycle -----------------------------------------------------------------------------
    def setup(self, student: Any, teacher: Any, datamodule: Any) -> None:
        input_shape = getattr(datamodule, "input_shape", None)
        if teacher is None:
            raise ValueError("rdim needs a teacher")
        if input_shape is None:
            raise ValueError(
                "rdim sizes its adapter by probing the models: setup() needs a datamodule with an input_shape"
            )
        self._datamodule = datamodule
        s = self.select(student.probe(tuple(input_shape), self.reads), "student")
        t = self.select(teacher.probe(tuple(input_shape), self.reads), "teacher")
        connector = Connector(s.shape[1:], t.shape[1:])
        if self.connector is None or (self.connector.student_shape, self.connector.teacher_shape) != (
            connector.student_shape,
            connector.teacher_shape,
        ):
            self.connector = connector.to(s.device)
        channels = self.connector.out_channels
        dim = self.resolve_dim(channels)
        if tuple(self.projection_matrix.shape) != (channels, dim):
            self.projection_matrix = torch.zeros(channels, dim, device=self.fitted.device)
            self._mark_fitted(False)
        if self.projection == "random" and not self.standardize and not self._fitted:
            self.projection_matrix.copy_(random_orthogonal(channels, dim, self.seed))
            self._mark_fitted(True)  # needs no data

    def on_fit_start(self, host: Any) -> None:
        if self._fitted:
            return  # fitted earlier or restored from a checkpoint
        datamodule = self._datamodule or getattr(host.trainer, "datamodule", None)
        if datamodule is None:
            raise ValueError("rdim fits its projection on the training split: it needs a datamodule")
        self.fit(host.teacher, datamodule.train_eval_dataloader(), host.device)

    @torch.no_grad()
    def fit(self, teacher: Any, loader: Any, device: torch.device | str | None = None) -> None:
        """Fit the teacher statistics and the projection on the teacher's features over ``loader``."""
        if self.connector is None:
            raise RuntimeError("rdim: call setup() before fit()")
        device = torch.device(device) if device is not None else self.fitted.device
        channels, dim = self.projection_matrix.shape
        needs_data = self.standardize or self.projection != "random"
        if needs_data:
            moments, samples = StreamingMoments(), []
            n_batches = len(loader) if self.fit_batches is None else min(len(loader), self.fit_batches)
            per_batch = math.ceil(self.ae_max_tokens / max(1, n_batches))
            generator = torch.Generator().manual_seed(self.seed)
            was_training = teacher.training
            teacher.eval()  # BN statistics of the teacher must not move
            try:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    for i, (x, *_) in enumerate(loader):
                        if i >= n_batches:
                            break
                        out = teacher(x.to(device), self.reads)
                        tokens = to_tokens(self.connector.teacher(self.select(out, "teacher"))).double()
                        moments.update(tokens)
                        if self.projection == "ae":
                            keep = torch.randperm(tokens.shape[0], generator=generator)[:per_batch]
                            samples.append(tokens[keep.to(tokens.device)].float())
            finally:
                teacher.train(was_training)
            mean, cov = moments.mean(), moments.covariance()
            scale = cov.diagonal().clamp_min(1e-12).sqrt()
            if self.standardize:
                self.teacher_mean = mean.float().to(self.fitted.device)
                self.teacher_scale = scale.float().to(self.fitted.device)
                cov = cov / torch.outer(scale, scale)
        if self.projection == "random":
            basis = random_orthogonal(channels, dim, self.seed)
        elif self.projection == "pca":
            basis = pca_directions(cov, dim)
        else:
            tokens = torch.cat(samples)
            if self.standardize:
                tokens = (tokens - self.teacher_mean.to(tokens)) / self.teacher_scale.to(tokens)
            encoder = fit_autoencoder(tokens, dim, self.ae_hidden, self.ae_epochs, self.ae_lr, seed=self.seed)
            if self.nonlinear:
                first, last = encoder[0], encoder[2]
                self.ae_w1, self.ae_b1 = first.weight.detach().clone(), first.bias.detach().clone()
                self.ae_w2, self.ae_b2 = last.weight.detach().clone(), last.bias.detach().clone()
                basis = torch.zeros(channels, dim)
            else:
                basis = _sign_fix(orthonormal_basis(encoder[0].weight.detach().t())).float()
        self.projection_matrix.copy_(basis.to(self.projection_matrix))
        for name in ("ae_w1", "ae_b1", "ae_w2", "ae_b2"):
            setattr(self, name, getattr(self, name).to(self.fitted.device))
        if distributed():  # every rank fitted on the same data; make the buffers bit-identical anyway
            for buf in (
                self.projection_matrix,
                self.teacher_mean,
                self.teacher_scale,
                self.ae_w1,
                self.ae_b1,
                self.ae_w2,
                self.ae_b2,
            ):
                if buf.numel():
                    torch.distributed.broadcast(buf, src=0)
        self._mark_fitted(True)

    # -- loss ----------------------------------------------------------------------------------
    def loss(self, student: ModelOutput, teacher: ModelOutput | None, y: Tensor, index: Tensor) -> Terms:
        if not self._fitted or self.connector is None:
            raise RuntimeError(
                "rdim: the projection is not fitted; the module calls setup() and "
                "on_fit_start(); outside Lightning call method.setup(...) and method.fit(...)"
            )
        student_tokens = to_tokens(self.connector(self.select(student, "student")))
        teacher_tokens = self.teacher_target(self.select(teacher, "teacher"))
        if self.nonlinear:
            rdim = (self.project(student_tokens) - self.project(teacher_tokens).detach()).pow(2).mean()
        else:
            rdim = rdim_loss(student_tokens, teacher_tokens, self.projection_matrix)
        ce = F.cross_entropy(student.logits, y)
        terms = {"ce": ce, "rdim": rdim}
        loss = self.ce_weight * ce + self.weight * rdim
        if self.kd_weight > 0:
            terms["kd"] = kd_loss(student.logits, teacher.logits, self.temperature)
            loss = loss + self.kd_weight * terms["kd"]
        terms["loss"] = loss
        return terms
