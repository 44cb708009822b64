"""``kdx-bench pair=lm``: the language-model pair of the benchmark (``lm.*`` in ``conf/bench.yaml``).

Models: the tiny GPT-2 teacher and student of ``conf/model/<lm.teacher>.yaml`` / ``<lm.student>.yaml``
with a vocabulary of ``lm.vocab_size``, on packed blocks of the generated corpus (:mod:`kdx.data.lm`,
built in a temporary folder). The teacher is first trained ``lm.teacher_steps`` plain steps (Adam,
next-token cross-entropy) so that its distributions are a language model's, not a random network's;
the student ``lm.student_steps`` steps.

Sides, each timed over ``lm.steps`` training steps after ``warmup_steps``, alternating over ``lm.rounds``;
a segment's figure is its median step (every block has the same shape, so the median drops the steps
the machine stalled without favouring a side), a side's the median over rounds (this thread's CPU time
on a CPU, wall time on a GPU):

* ``plain``: a hand-written loop: student forward, teacher forward under ``no_grad``, token-level
  forward KL over the unmasked positions, Adam step;
* ``kdx``: ``Trainer.fit`` on kdx's ``DistillationModule`` (built by ``make_module``, as kdx-train
  builds it) with ``method=fkl`` and the live teacher;
* ``cached``: the same with ``teacher.cache=topk`` (k = ``lm.cache_topk``), filled before the timed steps;
* ``lightning``: a bare ``LightningModule`` doing the plain loop's step, nothing logged: what Lightning's
  loop costs by itself, the floor of any Lightning-based step.

Reported: ``ratio_kdx_over_plain``, ``ratio_lightning_over_plain``, ``ratio_kdx_over_lightning`` and
``ratio_cached_over_live`` (cached kdx over live kdx); per step (:func:`kdx.bench_loop.per_step`): the
milliseconds the bare LightningModule and kdx add to the plain loop's step, their ratio in each round, and
the plain step from which that fixed cost leaves 0.97 of the plain loop; and for
every k of ``lm.topk`` on held-out blocks: the bytes the cache stores per token, the KL between the
full teacher distribution and its reconstruction from the stored (float16) top-k target, per
position, and the relative difference of the student's forward-KL loss on the cached target against
the live teacher's.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from kdx.bench_loop import _StepTimer, _trainer, median_step, per_step, per_step_lines, timed_loop
from kdx.data.base import KDDataModule
from kdx.data.lm import BlockDataset, LMDataModule
from kdx.methods.base import METHODS
from kdx.models.base import ModelOutput
from kdx.models.causal_lm import causal_lm
from kdx.pipeline.build import make_module
from kdx.teacher_outputs import (
    TopKTarget,
    topk_bytes_per_token,
    topk_log_probs,
    topk_target,
)

CONF_MODEL = Path(__file__).resolve().parents[2] / "conf" / "model"


def _model(name: str, vocab: int) -> torch.nn.Module:
    node = OmegaConf.load(CONF_MODEL / f"{name}.yaml")
    return causal_lm(config=OmegaConf.to_container(node.config, resolve=True), vocab_size=vocab)  # type: ignore[arg-type]


class _Blocks(KDDataModule):
    """Fixed blocks, in order, full batches: the plain loop's batches one for one."""

    input_kind = "lm"

    def __init__(self, dataset: BlockDataset, batch_size: int, vocab: int):
        super().__init__(batch_size=batch_size, drop_last=True)
        self.dataset, self.num_classes = dataset, vocab

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self.dataset

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, drop_last=True)


def _token_kl(student_logits, teacher_logits, y):
    mask = y != -100
    log_q = F.log_softmax(student_logits.float(), -1)
    log_p = F.log_softmax(teacher_logits.float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def timed_blocks(train: BlockDataset, n: int) -> BlockDataset:
    """The first ``n`` training blocks in order, from the first again where the corpus has fewer."""
    rows = torch.arange(n) % len(train.blocks)
    return BlockDataset(train.blocks[rows], train.lengths[rows])


def _train(model, loader, steps: int, lr: float, device) -> None:
    """``steps`` plain steps of next-token cross-entropy (the teacher before the bench, the student)."""
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    done = 0
    while done < steps:
        for x, y, _ in loader:
            x = {k: v.to(device) for k, v in x.items()}
            logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done >= steps:
                break


def plain_segment(student, teacher, dataset, cfg, device) -> float:
    """Blocks/s of the hand-written loop at its median step."""
    student.to(device).train()
    teacher.to(device).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(student.parameters(), lr=float(cfg.lm.lr))

    def step(i: int, x: Any, y: torch.Tensor) -> None:
        x, y = {k: v.to(device, non_blocking=True) for k, v in x.items()}, y.to(device, non_blocking=True)
        logits = student(x)
        with torch.no_grad():
            teacher_logits = teacher(x)
        loss = _token_kl(logits, teacher_logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    batches = DataLoader(dataset, batch_size=cfg.lm.batch_size, shuffle=False, drop_last=True)
    return int(cfg.lm.batch_size) / median_step(timed_loop(batches, step, int(cfg.warmup_steps), device))


def kdx_segment(student, teacher, dataset, cfg, device, cache_dir: str) -> float:
    """Blocks/s of kdx's step, the module built by the one builder (``make_module``) as kdx-train
    builds it: ``method=fkl``, Adam, the teacher live or (``cached``) from ``teacher.cache=topk``."""
    cached = cache_dir is not None
    run = OmegaConf.create(
        {
            "seed": int(cfg.seed),
            "dataset": {
                "name": "lm_bench",
                "num_classes": int(cfg.lm.vocab_size),
                "block_size": int(cfg.lm.block_size),
            },
            "student": {"name": str(cfg.lm.student), "stage_names": None},
            "teacher": {
                "name": str(cfg.lm.teacher),
                "model": {"name": str(cfg.lm.teacher)},
                "stage_names": None,
                "cache": "topk" if cached else "off",
                "cache_topk": int(cfg.lm.cache_topk),
            },
            "optim": {
                "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": float(cfg.lm.lr)}
            },
            "paths": {"cache_dir": cache_dir},
            "trainer": {"log_every_n_steps": int(cfg.get("log_every_n_steps", 10))},
        }
    )
    return _fit(make_module(run, student, METHODS["fkl"](), teacher), dataset, cfg, device)


class BareLM(L.LightningModule):
    """The plain loop's step as a user would write it in Lightning, nothing logged."""

    def __init__(self, student, teacher, lr: float):
        super().__init__()
        self.student, self.teacher, self.lr = student, teacher.eval().requires_grad_(False), lr

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self.student(x)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return _token_kl(logits, teacher_logits, y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.student.parameters(), lr=self.lr)


def _fit(module, dataset, cfg, device) -> float:
    timer = _StepTimer(int(cfg.warmup_steps), device)
    # full precision whatever bench.yaml's precision: the plain loop beside it runs in float32
    trainer = _trainer(cfg, timer, max_epochs=1, precision="32-true")
    trainer.fit(module, datamodule=_Blocks(dataset, int(cfg.lm.batch_size), int(cfg.lm.vocab_size)))
    return int(cfg.lm.batch_size) / median_step([*timer.stamps, timer.end])


@torch.no_grad()
def topk_error(student, teacher, dataset, ks, vocab: int, device) -> list[dict[str, Any]]:
    """Per k: bytes per token, KL(full teacher ‖ reconstruction) per position, and the relative
    difference of the student's forward-KL loss on the cached target against the live teacher's."""
    student.to(device).eval()
    teacher.to(device).eval()
    loader = DataLoader(dataset, batch_size=64, shuffle=False)
    method = METHODS["fkl"]()
    sums = {int(k): [0.0, 0.0, 0] for k in ks}
    live_loss = 0.0
    for x, y, _ in loader:
        x, y = {k: v.to(device) for k, v in x.items()}, y.to(device)
        s_logits, t_logits = student(x), teacher(x)
        log_p = F.log_softmax(t_logits.float(), -1)
        mask = y != -100
        live = method.loss(ModelOutput(s_logits), ModelOutput(t_logits), y, None)["loss"]
        live_loss += float(live)
        for k in sums:
            t = topk_target(t_logits, k)
            stored = TopKTarget(t.logp.half(), t.ids, t.rest.half())  # what the cache keeps
            kl = (log_p.exp() * (log_p - topk_log_probs(stored, vocab))).sum(-1)
            sums[k][0] += float((kl * mask).sum())
            sums[k][2] += int(mask.sum())
            sums[k][1] += float(
                method.loss(ModelOutput(s_logits), ModelOutput(None, topk=stored), y, None)["loss"]
            )  # type: ignore[arg-type]
    return [
        {
            "k": k,
            "bytes_per_token": topk_bytes_per_token(k, vocab),
            "full_fp32_bytes_per_token": 4 * vocab,
            "reconstruction_kl": round(kl_sum / max(1, n), 6),
            "student_loss_rel_diff": round(abs(loss_sum - live_loss) / max(live_loss, 1e-12), 6),
        }
        for k, (kl_sum, loss_sum, n) in sums.items()
    ]


def bench_lm(cfg: DictConfig, device: torch.device | None = None) -> dict[str, Any]:
    """The LM pair; ``device``: where kdx.bench put the run (by default from ``cfg.accelerator``)."""
    L.seed_everything(cfg.seed, verbose=False)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    if device is None:
        device = torch.device(
            "cuda" if cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"
        )
    lm = cfg.lm
    vocab = int(lm.vocab_size)
    with tempfile.TemporaryDirectory(prefix="kdx-bench-lm-") as tmp:
        data = LMDataModule(
            tmp,
            vocab_size=vocab,
            block_size=int(lm.block_size),
            num_train=int(lm.documents),
            num_val=400,
            num_test=10,
        )
        data.setup()
        train, held_out = data.train_set, data.val_set
        n = int(lm.batch_size) * (int(cfg.warmup_steps) + int(lm.steps))
        timed = timed_blocks(train, n)
        teacher0, student0 = _model(str(lm.teacher), vocab), _model(str(lm.student), vocab)
        loader = DataLoader(train, batch_size=int(lm.batch_size), shuffle=True)
        _train(teacher0, loader, int(lm.teacher_steps), float(lm.lr), device)
        _train(student0, loader, int(lm.student_steps), float(lm.lr), device)
        rates: dict[str, list[float]] = {"plain": [], "lightning": [], "kdx": [], "cached": []}
        sides = list(rates)
        for round_ in range(int(lm.rounds)):
            for side in sides if round_ % 2 == 0 else sides[::-1]:
                student, teacher = copy.deepcopy(student0), copy.deepcopy(teacher0)
                if side == "plain":
                    rates[side].append(plain_segment(student, teacher, timed, cfg, device))
                elif side == "lightning":
                    rates[side].append(_fit(BareLM(student, teacher, float(lm.lr)), timed, cfg, device))
                else:
                    rates[side].append(
                        kdx_segment(student, teacher, timed, cfg, device, tmp if side == "cached" else None)
                    )
        median = {side: statistics.median(values) for side, values in rates.items()}
        errors = topk_error(student0, teacher0, held_out, list(lm.topk), vocab, device)
    return {
        "pair": "lm",
        "method": "fkl",
        "teacher": str(lm.teacher),
        "student": str(lm.student),
        "vocab_size": vocab,
        "block_size": int(lm.block_size),
        "batch_size": int(lm.batch_size),
        "device": device.type,
        "threads": torch.get_num_threads(),
        "plain_samples_per_s": round(median["plain"], 2),
        "kdx_samples_per_s": round(median["kdx"], 2),
        "cached_samples_per_s": round(median["cached"], 2),
        "lightning_samples_per_s": round(median["lightning"], 2),
        "ratio_kdx_over_plain": round(median["kdx"] / median["plain"], 4),
        "ratio_lightning_over_plain": round(median["lightning"] / median["plain"], 4),
        "ratio_kdx_over_lightning": round(median["kdx"] / median["lightning"], 4),
        "ratio_cached_over_live": round(median["cached"] / median["kdx"], 4),
        "cache_topk": int(lm.cache_topk),
        "topk": errors,
        "rounds": int(lm.rounds),
        "steps_per_segment": int(lm.steps),
        **per_step({side: rates[side] for side in ("plain", "lightning", "kdx")}, int(lm.batch_size)),
    }


def lm_table(result: dict[str, Any]) -> str:
    """The human-readable lines printed above the JSON line."""
    lines = [
        f"language-model pair: {result['teacher']} -> {result['student']}, vocabulary {result['vocab_size']}, "
        f"blocks of {result['block_size']}, batch {result['batch_size']} ({result['device']})",
        f"{'side':<40}{'blocks/s':>12}{'ratio':>10}",
        f"{'plain PyTorch (forward KL, live teacher)':<40}{result['plain_samples_per_s']:>12.1f}{1:>10.3f}",
        f"{'bare LightningModule (the same step)':<40}{result['lightning_samples_per_s']:>12.1f}"
        f"{result['ratio_lightning_over_plain']:>10.3f}",
        f"{'kdx (fkl, live teacher)':<40}{result['kdx_samples_per_s']:>12.1f}{result['ratio_kdx_over_plain']:>10.3f}"
        f"   ({result['ratio_kdx_over_lightning']:.3f} of bare Lightning)",
        f"{'kdx (fkl, top-' + str(result['cache_topk']) + ' cache) / live':<40}"
        f"{result['cached_samples_per_s']:>12.1f}{result['ratio_cached_over_live']:>10.3f}",
        *per_step_lines(result, {"lightning": "bare LightningModule", "kdx": "kdx (fkl, live teacher)"}),
        f"{'k':>5}{'bytes/token':>13}{'(fp32 logits)':>15}{'KL(full‖recon)':>17}{'student loss Δ':>17}",
    ]
    for row in result["topk"]:
        lines.append(
            f"{row['k']:>5}{row['bytes_per_token']:>13}{row['full_fp32_bytes_per_token']:>15}"
            f"{row['reconstruction_kl']:>17.5f}{100 * row['student_loss_rel_diff']:>16.2f}%"
        )
    return "\n".join(lines)


# the pair protocol of kdx.bench.PAIRS: bench(cfg, device) -> dict, table(dict) -> str
bench = bench_lm
table = lm_table
