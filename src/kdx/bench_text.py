"""``kdx-bench pair=text``: kdx's KD step on text against a plain PyTorch/HF loop, and what batching costs.

A BERT teacher and student built from their configs (random init; ``text.teacher`` /
``text.student`` name files of ``conf/model``, default 2-layer/64 → 2-layer/32) distil on generated
token sequences whose lengths follow SST-2's training split (:data:`SST2_LENGTHS`). Every side runs
in this process on the same models, batches and optimizer recipe, in alternating segments after
warm-up; a side's figure is its median over ``text.rounds``:

* ``plain``: a hand-written loop (Hinton KD, live teacher, as in :mod:`kdx.bench`) on length-grouped
  batches trimmed to their longest row;
* ``lightning``: a bare LightningModule doing the plain loop's step on the same batches, logging
  nothing (Lightning's floor);
* ``kdx``: ``Trainer.fit`` on the real ``DistillationModule`` with the configured method on the same
  batches: ``ratio_kdx_over_plain_kd`` is kdx's cost on text, ``ratio_kdx_over_lightning`` the part
  of it that is kdx's own (the module, the method, the metrics) rather than Lightning's loop;
* ``kdx_random``: kdx on shuffled batches, each trimmed to its longest row (dynamic padding alone);
* ``kdx_fixed``: kdx on the same shuffled batches padded to ``max_length`` (no trimming).

``gain_grouped_over_fixed`` and ``gain_grouped_over_random`` are kdx's samples/s with length grouping
over the other two batchings. The batches are the first ``warmup_steps + steps`` of an epoch of
:class:`~kdx.data.sampling.LengthGroupedBatchSampler` over a pool of ``pool_batches`` batches (with
``group=False`` for the shuffled ones), the sampler kdx's text data modules train with.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, default_collate

from kdx.bench_loop import BareKD, _kd_step, _StepTimer, _trainer, per_step, per_step_lines, timed_loop
from kdx.configs import conf_root
from kdx.data.base import KDDataModule
from kdx.data.sampling import EpochSeededSampler, LengthGroupedBatchSampler
from kdx.data.text import TextDataset, trim_padding
from kdx.pipeline.build import make_module

# Token lengths of SST-2's 67,349 training sentences ([CLS] + words + [SEP]; the sentences are
# tokenised into words by spaces, punctuation included: a WordPiece tokenizer trained on them splits
# few words further), counted once from GLUE's SST-2/train.tsv: SST2_LENGTHS[i] sentences have
# 3 + i tokens (3 .. 54). Mean 11.4 tokens, median 9, 99th percentile 38.
SST2_LENGTHS = (
    4270, 7241, 7031, 5511, 4578, 4019, 3594, 3092, 2861, 2564, 2230, 2051, 1830, 1748, 1560, 1388,
    1265, 1182, 1040, 922, 860, 820, 741, 654, 572, 505, 460, 416, 335, 297, 281, 253, 226, 166, 152,
    108, 90, 91, 60, 55, 53, 34, 30, 24, 27, 17, 9, 11, 9, 7, 6, 3,
)  # fmt: skip
SHORTEST = 3
BATCHINGS = ("grouped", "random", "fixed")


def sst2_lengths(n: int, seed: int, max_length: int) -> torch.Tensor:
    """``n`` sequence lengths drawn from SST-2's training length distribution, at most ``max_length``."""
    weights = torch.tensor(SST2_LENGTHS, dtype=torch.float)
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.multinomial(weights, n, replacement=True, generator=generator) + SHORTEST
    return drawn.clamp(max=max_length)


def token_dataset(lengths: torch.Tensor, vocab_size: int, max_length: int, seed: int) -> TextDataset:
    """Random token ids ([CLS]=2 … [SEP]=3 around ids of the vocabulary's rest) padded to ``max_length``,
    as the text data modules store their splits; two balanced classes."""
    generator = torch.Generator().manual_seed(seed + 1)
    n = lengths.shape[0]
    positions = torch.arange(max_length)[None]
    mask = (positions < lengths[:, None]).long()
    ids = torch.randint(5, vocab_size, (n, max_length), generator=generator) * mask
    ids[:, 0] = 2
    ids[torch.arange(n), lengths - 1] = 3
    labels = torch.randint(0, 2, (n,), generator=generator)
    return TextDataset({"input_ids": ids, "attention_mask": mask}, labels)


def batches_of(
    dataset: TextDataset, batching: str, batch_size: int, count: int, seed: int
) -> list[list[int]]:
    """The first ``count`` batches of an epoch: length-grouped (``grouped``) or shuffled."""
    sampler = LengthGroupedBatchSampler(
        EpochSeededSampler(len(dataset), seed),
        batch_size,
        drop_last=True,
        lengths=dataset.lengths,
        seed=seed,
        group=batching == "grouped",
    )
    return sampler.epoch_batches()[:count]


def _padded(samples: list) -> Any:
    return default_collate(samples)  # fixed padding: every batch keeps max_length


def loader(dataset: TextDataset, batches: list[list[int]], batching: str) -> DataLoader:
    return DataLoader(
        dataset, batch_sampler=batches, collate_fn=_padded if batching == "fixed" else trim_padding
    )


class TextBatches(KDDataModule):
    """The bench's fixed token batches as a kdx data module (training only, in the given order)."""

    input_kind = "tokens"
    name = "sst2_shaped"

    def __init__(self, dataset: TextDataset, batches: list[list[int]], batching: str, max_length: int):
        super().__init__(batch_size=len(batches[0]), drop_last=True)
        self.dataset, self.batches, self.batching_kind = dataset, batches, batching
        self.num_classes, self.input_shape = 2, (max_length,)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self.dataset

    def train_dataloader(self) -> DataLoader:
        return loader(self.dataset, self.batches, self.batching_kind)


def model_config(name: str) -> DictConfig:
    """``conf/model/<name>.yaml`` over ``conf/model/hf.yaml`` (the model files' one default)."""
    folder = conf_root() / "model"
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"text.teacher/text.student={name}: no conf/model/{name}.yaml")
    own = OmegaConf.load(path)
    defaults = [d for d in own.pop("defaults", []) if d != "_self_"]
    if defaults not in ([], ["hf"]):
        raise ValueError(
            f"conf/model/{name}.yaml: the text bench reads Hugging Face model configs (defaults: [hf])"
        )
    merged = OmegaConf.merge(OmegaConf.load(folder / "hf.yaml"), own)
    assert isinstance(merged, DictConfig)
    return merged


def build_model(name: str, vocab_size: int) -> torch.nn.Module:
    cfg = model_config(name)
    if cfg.get("config") is None:
        raise ValueError(
            f"conf/model/{name}.yaml loads a checkpoint; the text bench builds random-init models "
            "from a model.config (e.g. bert_l2_h64, bert_l2_h32)"
        )
    return instantiate(cfg, num_classes=2, vocab_size=vocab_size, tokenizer=None, name_or_path=None)


def plain_segment(cfg, student, teacher, device, warmup: int, batches_loader: DataLoader) -> float:
    """samples/s of the hand-written loop (live teacher) over the timed batches."""
    student.to(device).train()
    teacher.to(device).eval().requires_grad_(False)
    optimizer = instantiate(cfg.optim.optimizer)(student.parameters())
    samples = 0

    def step(i: int, x: Any, y: torch.Tensor) -> None:
        nonlocal samples
        x = {k: v.to(device, non_blocking=True) for k, v in x.items()}
        loss = _kd_step(student, teacher, x, y.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        samples += y.shape[0] if i >= warmup else 0

    stamps = timed_loop(batches_loader, step, warmup, device)
    return samples / (stamps[-1] - stamps[0])


def kdx_segment(cfg, student, teacher, device, data: TextBatches, bare: bool = False) -> float:
    """samples/s of ``Trainer.fit`` on kdx's module (``bare``: on :class:`~kdx.bench_loop.BareKD`)."""
    if bare:
        module: Any = BareKD(student, teacher, instantiate(cfg.optim.optimizer))
    else:
        module_cfg = OmegaConf.create(
            {"dataset": {"num_classes": 2}, "student": {}, "teacher": {"cache": "off"}}
        )
        optim = OmegaConf.create({"optimizer": cfg.optim.optimizer})
        module = make_module(module_cfg, student, instantiate(cfg.method), teacher, optim=optim)
    timer = _StepTimer(int(cfg.text.warmup_steps), device)
    _trainer(cfg, timer, 1).fit(module, datamodule=data)
    return timer.samples / (timer.end - timer.start)


def bench(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    tcfg = cfg.text
    seed, batch, max_length = int(cfg.seed), int(tcfg.batch_size), int(tcfg.max_length)
    count = int(tcfg.warmup_steps) + int(tcfg.steps)
    pool = max(int(tcfg.pool_batches), count) * batch
    dataset = token_dataset(sst2_lengths(pool, seed, max_length), int(tcfg.vocab_size), max_length, seed)
    batches = {
        "grouped": batches_of(dataset, "grouped", batch, count, seed),
        "random": batches_of(dataset, "random", batch, count, seed),
    }
    batches["fixed"] = batches["random"]
    student0 = build_model(str(tcfg.student), int(tcfg.vocab_size))
    teacher0 = build_model(str(tcfg.teacher), int(tcfg.vocab_size))
    sides = ["plain", "lightning", *(f"kdx_{b}" for b in BATCHINGS)]
    rates: dict[str, list[float]] = {side: [] for side in sides}
    for round_ in range(int(tcfg.rounds)):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            student, teacher = copy.deepcopy(student0), copy.deepcopy(teacher0)
            if side == "plain":
                timed = loader(dataset, batches["grouped"], "grouped")
                rates[side].append(
                    plain_segment(cfg, student, teacher, device, int(tcfg.warmup_steps), timed)
                )
                continue
            batching = "grouped" if side == "lightning" else side.removeprefix("kdx_")
            data = TextBatches(dataset, batches[batching], batching, max_length)
            rates[side].append(kdx_segment(cfg, student, teacher, device, data, bare=side == "lightning"))
    median = {side: statistics.median(values) for side, values in rates.items()}
    lengths = dataset.lengths
    timed = {name: b[int(tcfg.warmup_steps) :] for name, b in batches.items()}
    tokens = {  # mean sequence length a batch is computed at
        name: statistics.mean(max_length if name == "fixed" else int(lengths[b].max()) for b in bs)
        for name, bs in timed.items()
    }
    return {
        "pair": "text",
        "method": instantiate(cfg.method).name,
        "teacher": str(tcfg.teacher),
        "student": str(tcfg.student),
        "batch_size": batch,
        "max_length": max_length,
        "vocab_size": int(tcfg.vocab_size),
        "device": device.type,
        "threads": torch.get_num_threads(),
        "mean_example_tokens": round(float(lengths.float().mean()), 2),
        **{f"mean_batch_tokens_{name}": round(value, 2) for name, value in tokens.items()},
        "plain_kd_samples_per_s": round(median["plain"], 2),
        "kdx_samples_per_s": round(median["kdx_grouped"], 2),
        "ratio_kdx_over_plain_kd": round(median["kdx_grouped"] / median["plain"], 4),
        "lightning_samples_per_s": round(median["lightning"], 2),
        "ratio_lightning_over_plain_kd": round(median["lightning"] / median["plain"], 4),
        "ratio_kdx_over_lightning": round(median["kdx_grouped"] / median["lightning"], 4),
        "kdx_random_samples_per_s": round(median["kdx_random"], 2),
        "kdx_fixed_samples_per_s": round(median["kdx_fixed"], 2),
        "gain_grouped_over_random": round(median["kdx_grouped"] / median["kdx_random"], 4),
        "gain_grouped_over_fixed": round(median["kdx_grouped"] / median["kdx_fixed"], 4),
        "rounds": int(tcfg.rounds),
        "steps_per_segment": int(tcfg.steps),
        # the three sides on the same length-grouped batches: what each adds to the plain loop's step
        **per_step({side: rates[side] for side in ("plain", "lightning", "kdx_grouped")}, batch),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"text pair: {result['teacher']} -> {result['student']}, {result['method']}, batch {result['batch_size']}, "
        f"SST-2-shaped sequences (mean {result['mean_example_tokens']:.1f} tokens, max_length {result['max_length']})",
        f"{'side':<44}{'tokens/batch':>13}{'samples/s':>12}{'ratio':>9}",
        f"{'plain PyTorch/HF (kd), length-grouped':<44}{result['mean_batch_tokens_grouped']:>13.1f}"
        f"{result['plain_kd_samples_per_s']:>12.1f}{1:>9.3f}",
        f"{'bare LightningModule, length-grouped':<44}{result['mean_batch_tokens_grouped']:>13.1f}"
        f"{result['lightning_samples_per_s']:>12.1f}{result['ratio_lightning_over_plain_kd']:>9.3f}   (Lightning's floor)",
        f"{'kdx (' + result['method'] + '), length-grouped':<44}{result['mean_batch_tokens_grouped']:>13.1f}"
        f"{result['kdx_samples_per_s']:>12.1f}{result['ratio_kdx_over_plain_kd']:>9.3f}   (kdx / plain; "
        f"kdx / bare Lightning {result['ratio_kdx_over_lightning']:.3f})",
        f"{'kdx, shuffled batches, dynamic padding':<44}{result['mean_batch_tokens_random']:>13.1f}"
        f"{result['kdx_random_samples_per_s']:>12.1f}{1 / result['gain_grouped_over_random']:>9.3f}   (/ kdx grouped)",
        f"{'kdx, shuffled batches, padded to max_length':<44}{result['mean_batch_tokens_fixed']:>13.1f}"
        f"{result['kdx_fixed_samples_per_s']:>12.1f}{1 / result['gain_grouped_over_fixed']:>9.3f}   (/ kdx grouped)",
        f"length grouping: {result['gain_grouped_over_random']:.2f}x over dynamic padding alone, "
        f"{result['gain_grouped_over_fixed']:.2f}x over fixed padding",
        *per_step_lines(result, {"lightning": "bare LightningModule", "kdx_grouped": "kdx"}),
    ]
    return "\n".join(lines)
