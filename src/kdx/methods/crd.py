"""``crd``: Tian, Krishnan & Isola, *Contrastive Representation Distillation* (ICLR 2020; official
code HobbitLong/RepDistiller, ``crd/criterion.py``, ``crd/memory.py``, ``train_student.py``).

Both penultimate embeddings go through a learned head ``g(f) = normalize(W f + b)`` to ``feat_dim``
dimensions. Two memory banks over the training set, ``M_s`` and ``M_t`` (N × feat_dim), hold a
momentum average of each example's student and teacher head output. For the example ``i`` of a
batch, with ``K`` negatives ``j_1..j_K`` and the positive ``j_0 = i``::

    p_s[i, k] = exp(M_t[j_k] · g_s(f_s,i) / τ) / Z_s      (student anchor, teacher memory)
    p_t[i, k] = exp(M_s[j_k] · g_t(f_t,i) / τ) / Z_t      (teacher anchor, student memory)
    NCE(p) = −(1/B) Σ_i [ log(p[i,0] / (p[i,0] + K/N)) + Σ_{k≥1} log((K/N) / (p[i,k] + K/N)) ]
    L = ce_weight·CE + weight·(NCE(p_s) + NCE(p_t)) [+ kd_weight·T²·KL(p_t ‖ p_s)]

``Z`` is fixed at the first step to ``N · mean(exp(scores/τ))`` of that batch (RepDistiller's
estimate of the partition function; under DDP the ranks' estimates are averaged) and kept in a
buffer. After the scores, each bank row of the batch is updated in place:
``M[i] ← normalize(m·M[i] + (1−m)·g(f_i))`` (``index_copy_``; no copy of the bank per step). The
update is applied just before the next batch's scores (or when the banks are saved, or at the
epoch's end), because this batch's backward still reads the bank: the next batch sees exactly the
bank RepDistiller's would.
Banks start uniform in ±1/√(feat_dim/3), from a seeded generator, so every DDP rank starts equal.

Negatives (``negatives``): ``other_class`` (default) draws them uniformly from the training examples
of the other classes, as RepDistiller's CIFAR-100 and ImageNet data sets do for ``--mode exact``
(without replacement when the pool is large enough, else with replacement, as ``np.random.choice``
there); ``uniform`` draws them from the whole training set (``ContrastMemory``'s own sampler).
The training-set size ``N`` (and the labels, for ``other_class``) come from the datamodule in
``setup`` (``num_data`` overrides ``N``); without a datamodule, from the training loader's dataset
at the first epoch.

Negatives are drawn from a generator seeded by (``seed``, global step, rank): a resumed run draws
the same ones, and DDP ranks draw different ones. DDP: indices and head outputs of every rank are
all-gathered before the banks are updated, so every rank applies the same update and the banks stay
identical; the banks are therefore left out of DDP's per-step buffer
broadcast (they are the module's extra state, not buffers). Scores are computed as one dense
product with the bank and then gathered when N ≤ 4(K+1) (CIFAR: N = 50 000, K = 16 384), which
avoids materialising the B × (K+1) × feat_dim block of bank rows; otherwise rows are gathered.

Defaults (RepDistiller ``train_student.py`` and ``scripts/run_cifar_distill.sh``: ``--distill crd
-a 0 -b 0.8``, ``-r`` = 1): feat_dim 128, nce_k 16384, nce_t 0.07, nce_m 0.5, weight 0.8, CE weight 1,
no KD term. CRD+KD in the paper is ``-a 1 -b 0.8``: ``method.kd_weight=1`` (T = 4).

Deviations from the paper: none in the loss. In the sampler: with-replacement vs without is decided
once for the training set (by the smallest pool of negatives), not per class; the normalisation adds ε = 1e-12
(``F.normalize``) where RepDistiller divides by the bare norm.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdx.context import StepContext
from kdx.distributed import distributed, gather_rows
from kdx.errors import HyperParameterError, KDXError
from kdx.losses import kd_loss
from kdx.methods.base import DistillationMethod, Terms, register_method
from kdx.models.base import EMBEDDING, LOGITS, ModelOutput
from kdx.seeding import key_seed

NEGATIVES = ("other_class", "uniform")
PLAIN_TENSORS = ("memory_student", "memory_teacher", "labels", "by_class", "class_start", "class_count")
NCE_EPS = 1e-7  # RepDistiller's eps in ContrastLoss
# Dense scores (bank @ anchors, then gather) when N <= DENSE_FACTOR * (K + 1).
DENSE_FACTOR = 4


# ---------------------------------------------------------------------------------------------
# Pieces (pure functions, tested on their own).


class EmbedHead(nn.Module):
    """RepDistiller's ``Embed``: flatten, linear to ``dim_out``, L2-normalise."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def init_bank(num_data: int, feat_dim: int, seed: int) -> Tensor:
    """``(num_data, feat_dim)`` uniform in ±1/√(feat_dim/3) (RepDistiller's init), from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    std = 1.0 / math.sqrt(feat_dim / 3)
    return torch.rand(num_data, feat_dim, generator=generator).mul_(2 * std).sub_(std)


def nce_loss(probs: Tensor, num_data: int, eps: float = NCE_EPS) -> Tensor:
    """RepDistiller's ``ContrastLoss`` (the paper's Eq. 18): column 0 of ``probs`` (B, K+1) is the
    positive, the other K columns the negatives; the noise distribution is uniform, 1/N."""
    batch, k = probs.shape[0], probs.shape[1] - 1
    noise = k / float(num_data)
    positive, negatives = probs[:, 0], probs[:, 1:]
    log_d1 = torch.log(positive / (positive + noise + eps))
    log_d0 = torch.log(noise / (negatives + noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / batch


def contrast_scores(bank: Tensor, anchors: Tensor, sample_index: Tensor) -> Tensor:
    """``scores[i, k] = bank[sample_index[i, k]] · anchors[i]`` (B, K+1); the bank carries no gradient.

    Two equal ways: one dense product with the whole bank then a gather (cheap when N is not much
    larger than K+1), or a gather of the B·(K+1) rows then a batched product."""
    bank = bank.detach().to(anchors.dtype)
    if bank.shape[0] <= DENSE_FACTOR * sample_index.shape[1]:
        return (anchors @ bank.t()).gather(1, sample_index)
    rows = bank.index_select(0, sample_index.reshape(-1)).view(*sample_index.shape, -1)
    return torch.bmm(rows, anchors.unsqueeze(2)).squeeze(2)


@torch.no_grad()
def momentum_update_(bank: Tensor, index: Tensor, values: Tensor, momentum: float) -> None:
    """``bank[i] ← normalize(m·bank[i] + (1−m)·value)`` for the rows ``index``, in place."""
    rows = bank.index_select(0, index)
    rows.mul_(momentum).add_(values.detach().to(bank.dtype), alpha=1 - momentum)
    bank.index_copy_(0, index, F.normalize(rows, dim=1))


def last_occurrence(index: Tensor) -> tuple[Tensor, Tensor]:
    """Unique values of ``index`` and the position of each one's last occurrence (DDP's padding can
    repeat an example; ``index_copy_`` with repeated rows is nondeterministic on CUDA)."""
    unique, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(index.shape[0], device=index.device)
    last = torch.full_like(unique, -1).scatter_reduce_(0, inverse, positions, reduce="amax")
    return unique, last


def dataset_labels(dataset: Any) -> Tensor:
    """The label of every item of ``dataset``, in order; read from the wrapped arrays where kdx's
    datasets have them (no image is decoded), else by indexing every item."""
    from torch.utils.data import Subset, TensorDataset

    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long().cpu()
    inner = dataset.dataset if isinstance(dataset, Subset) else getattr(dataset, "base", None)
    indices = getattr(dataset, "indices", None)
    if inner is not None:
        labels = dataset_labels(inner)
        return labels if indices is None else labels[torch.as_tensor(list(indices), dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# The method.


@register_method("crd")
class CRD(DistillationMethod):
    reads = frozenset({LOGITS, EMBEDDING})

    def __init__(
        self,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
        weight: float = 0.8,
        ce_weight: float = 1.0,
        kd_weight: float = 0.0,
        temperature: float = 4.0,
        negatives: str = "other_class",
        num_data: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if feat_dim < 1 or nce_k < 1:
            raise HyperParameterError(f"method.feat_dim={feat_dim} and method.nce_k={nce_k} must be >= 1")
        if nce_t <= 0:
            raise HyperParameterError(f"method.nce_t={nce_t} must be > 0")
        if not 0.0 <= nce_m < 1.0:
            raise HyperParameterError(f"method.nce_m={nce_m} must lie in [0, 1)")
        if weight < 0 or ce_weight < 0 or kd_weight < 0:
            raise HyperParameterError("method.weight, method.ce_weight and method.kd_weight must be >= 0")
        if temperature <= 0:
            raise HyperParameterError(f"method.temperature={temperature} must be > 0")
        if negatives not in NEGATIVES:
            raise HyperParameterError(f"method.negatives={negatives!r} must be one of {', '.join(NEGATIVES)}")
        if num_data is not None and num_data < 2:
            raise HyperParameterError(f"method.num_data={num_data} must be >= 2 (or null: the training set)")
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = feat_dim, nce_k, nce_t, nce_m
        self.weight, self.ce_weight, self.kd_weight, self.temperature = (
            weight,
            ce_weight,
            kd_weight,
            temperature,
        )
        self.negatives, self.num_data, self.seed = negatives, num_data, seed
        self.embed_student: EmbedHead | None = None  # sized in setup (embedding widths)
        self.embed_teacher: EmbedHead | None = None
        # Z_s, Z_t; -1 = not estimated yet (RepDistiller's params[2:4])
        self.register_buffer("normalizers", torch.full((2,), -1.0))
        self._normalized = False  # a Python mirror of normalizers >= 0: no device sync per step
        # The banks (sized in setup) and the sampler's tables are plain tensors, not buffers: DDP
        # broadcasts every buffer from rank 0 at each forward, which would cost a bank-sized copy per
        # step (the ranks keep them equal themselves). `_apply` moves them with the module; the banks
        # are saved as the module's extra state, so checkpoints and resume carry them.
        self.memory_student = torch.zeros(0, feat_dim)
        self.memory_teacher = torch.zeros(0, feat_dim)
        # labels, and the example indices sorted by class with each class's start and count
        self.labels = torch.zeros(0, dtype=torch.long)
        self.by_class = torch.zeros(0, dtype=torch.long)
        self.class_start = torch.zeros(0, dtype=torch.long)
        self.class_count = torch.zeros(0, dtype=torch.long)
        self._distinct_negatives = False
        self._pending: tuple[Tensor, Tensor] | None = None  # (rows, values) of the last batch
        self._draw_key: tuple[int, int, int] | None = None  # (seed, step, rank) of the training step

    def _apply(self, fn, *args, **kwargs):
        self.flush_bank_update()
        super()._apply(fn, *args, **kwargs)
        for name in PLAIN_TENSORS:
            setattr(self, name, fn(getattr(self, name)))
        return self

    def get_extra_state(self) -> dict[str, Tensor]:
        self.flush_bank_update()
        return {"memory_student": self.memory_student, "memory_teacher": self.memory_teacher}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        device = self.normalizers.device
        self._pending = None
        self.memory_student = state["memory_student"].to(device, torch.float32).clone()
        self.memory_teacher = state["memory_teacher"].to(device, torch.float32).clone()

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._normalized = bool(self.normalizers[0] >= 0)

    # -- lifecycle -----------------------------------------------------------------------------
    def setup(self, student: Any, teacher: Any, datamodule: Any) -> None:
        if teacher is None:
            raise KDXError("crd needs a teacher; pick one (e.g. teacher=cnn1d)")
        dim_s, dim_t = self._embedding_width(student, "student"), self._embedding_width(teacher, "teacher")
        if self.embed_student is None or self.embed_student.linear.in_features != dim_s:
            self.embed_student = EmbedHead(dim_s, self.feat_dim).to(self.normalizers.device)
        if self.embed_teacher is None or self.embed_teacher.linear.in_features != dim_t:
            self.embed_teacher = EmbedHead(dim_t, self.feat_dim).to(self.normalizers.device)
        train_set = None if datamodule is None else datamodule.train_set
        if train_set is not None:
            self.prepare_data(train_set)

    @staticmethod
    def _embedding_width(model: Any, who: str) -> int:
        try:
            return int(model.classifier.in_features)
        except (AttributeError, TypeError):
            raise KDXError(
                f"crd reads the {who}'s embedding (the input of its final nn.Linear classifier), "
                f"but the {who} has no such classifier"
            ) from None

    def prepare_data(self, train_set: Any) -> None:
        """Size the banks for ``train_set`` (keeping them if already that size, e.g. restored) and
        build the other-class sampler from its labels."""
        size = self.num_data if self.num_data is not None else len(train_set)
        device = self.normalizers.device
        if self.memory_student.shape != (size, self.feat_dim):
            self.memory_student = init_bank(size, self.feat_dim, self.seed).to(device)
            self.memory_teacher = init_bank(size, self.feat_dim, self.seed + 1).to(device)
            self.normalizers.fill_(-1.0)
            self._normalized = False
        if self.negatives == "other_class":
            labels = dataset_labels(train_set)
            if labels.shape[0] != size:
                raise KDXError(
                    f"crd: method.num_data={size} but the training set has {labels.shape[0]} examples; "
                    "leave method.num_data null or use method.negatives=uniform"
                )
            self.set_labels(labels.to(device))

    def set_labels(self, labels: Tensor) -> None:
        counts = torch.bincount(labels)
        if int((counts > 0).sum()) < 2:
            raise KDXError("crd: negatives=other_class needs at least two classes in the training set")
        self.labels = labels
        self.by_class = torch.argsort(labels, stable=True)
        self.class_count = counts
        self.class_start = torch.cumsum(counts, 0) - counts
        # without replacement when every class's pool of negatives holds K examples (a Python bool:
        # no device sync per step)
        self._distinct_negatives = self.nce_k <= labels.shape[0] - int(counts.max())

    def on_train_epoch_end(self, ctx: StepContext) -> None:
        self.flush_bank_update()

    def on_train_epoch_start(self, ctx: StepContext) -> None:
        if self.memory_student.shape[0] == 0 or (
            self.negatives == "other_class" and self.labels.numel() == 0
        ):
            loader = ctx.train_dataloader
            dataset = getattr(loader, "dataset", None)
            if dataset is None:
                raise KDXError("crd sizes its memory banks by the training set: set method.num_data")
            self.prepare_data(dataset)

    # -- negatives -----------------------------------------------------------------------------
    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], ctx: StepContext) -> Terms:
        self._draw_key = (self.seed, ctx.step, ctx.rank)
        return super().training_step(batch, ctx)

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """A generator seeded by (seed, step, rank) in training: negatives are the same after a resume
        and differ between DDP ranks. Outside the training loop (tests), the global RNG."""
        if self._draw_key is None:
            return None
        return torch.Generator(device=device).manual_seed(key_seed(*self._draw_key))

    def sample_index(self, index: Tensor) -> Tensor:
        """``(B, K+1)``: column 0 the example itself, then K negatives."""
        size, k = self.memory_student.shape[0], self.nce_k
        generator = self._generator(index.device)
        if self.negatives == "uniform":
            negatives = torch.randint(0, size, (index.shape[0], k), device=index.device, generator=generator)
        else:
            negatives = self._other_class(index, k, generator)
        return torch.cat([index.unsqueeze(1), negatives], dim=1)

    def _other_class(self, index: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        y = self.labels[index]
        pool = self.labels.shape[0] - self.class_count[y]  # (B,) examples of the other classes
        if self._distinct_negatives:  # without replacement: the k largest of uniform keys
            keys = torch.rand(index.shape[0], self.labels.shape[0], device=index.device, generator=generator)
            keys.masked_fill_(self.labels.unsqueeze(0) == y.unsqueeze(1), -1.0)
            return keys.topk(k, dim=1).indices
        # with replacement: a uniform position among the other classes, skipping the own class's run
        draw = torch.rand(index.shape[0], k, device=index.device, generator=generator)
        draw = (draw * pool.unsqueeze(1)).long()
        draw = torch.minimum(draw, (pool - 1).unsqueeze(1))
        start, count = self.class_start[y].unsqueeze(1), self.class_count[y].unsqueeze(1)
        return self.by_class[draw + (draw >= start) * count]

    # -- loss ----------------------------------------------------------------------------------
    def contrastive_loss(
        self,
        student_embedding: Tensor,
        teacher_embedding: Tensor,
        index: Tensor,
        sample_index: Tensor | None = None,
    ) -> Tensor:
        """NCE(p_s) + NCE(p_t) for a batch, then the bank update (all ranks' rows under DDP)."""
        if self.memory_student.shape[0] == 0:
            raise RuntimeError(
                "crd: the memory banks are not sized yet; call setup() or prepare_data() first"
            )
        assert self.embed_student is not None and self.embed_teacher is not None
        v_s = self.embed_student(student_embedding)
        v_t = self.embed_teacher(teacher_embedding.detach())
        self.flush_bank_update()  # the previous batch's rows (its backward is done)
        if sample_index is None:
            sample_index = self.sample_index(index)
        size = self.memory_student.shape[0]
        # float32: exp(1/0.07) = 1.6e6 overflows float16
        exp_s = torch.exp(contrast_scores(self.memory_teacher, v_s, sample_index).float() / self.nce_t)
        exp_t = torch.exp(contrast_scores(self.memory_student, v_t, sample_index).float() / self.nce_t)
        if not self._normalized:
            estimate = torch.stack([exp_s.detach().mean(), exp_t.detach().mean()]).float() * size
            if distributed():
                torch.distributed.all_reduce(estimate)
                estimate /= torch.distributed.get_world_size()
            self.normalizers.copy_(estimate)
            self._normalized = True
        loss = nce_loss(exp_s / self.normalizers[0], size) + nce_loss(exp_t / self.normalizers[1], size)
        self.update_banks(index, v_s, v_t)
        return loss

    @torch.no_grad()
    def update_banks(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """Gather the batch's rows from every rank now (the ranks are in step here) and queue the
        update; it is applied before the next scores are computed (or the banks are saved), after
        this step's backward, which still needs the bank as it was."""
        self.flush_bank_update()
        index = gather_rows(index)
        values = gather_rows(torch.cat([v_s.detach(), v_t.detach()], dim=1).to(self.memory_student.dtype))
        if distributed():
            index, last = last_occurrence(index)
            values = values[last]
        self._pending = (index, values)

    @torch.no_grad()
    def flush_bank_update(self) -> None:
        """Apply the queued momentum update to both banks, in place."""
        if self._pending is None:
            return
        index, values = self._pending
        self._pending = None
        momentum_update_(self.memory_student, index, values[:, : self.feat_dim], self.nce_m)
        momentum_update_(self.memory_teacher, index, values[:, self.feat_dim :], self.nce_m)

    def loss(self, student: ModelOutput, teacher: ModelOutput | None, y: Tensor, index: Tensor) -> Terms:
        ce = F.cross_entropy(student.logits, y)
        crd = self.contrastive_loss(student.embedding, teacher.embedding, index)
        total = self.ce_weight * ce + self.weight * crd
        terms = {"ce": ce, "crd": crd}
        if self.kd_weight > 0:
            kd = kd_loss(student.logits, teacher.logits, self.temperature)
            total = total + self.kd_weight * kd
            terms["kd"] = kd
        return {"loss": total, **terms}
