"""``kdx-bench``: samples/s of kdx's real training step against a plain PyTorch loop, and kdx's fixed
per-step overhead.

Throughput (``conf/bench.yaml``: resnet56 → resnet20, batch 64 by default). Every side runs in this
process on the same student, teacher, random (deterministic) batch stream and optimizer recipe, in
alternating segments after warm-up; the figure of a side is its median over ``rounds``:

* ``plain``: a hand-written loop with Hinton KD (0.1·CE + 0.9·T²·KL at T=4) and a live teacher, in
  PyTorch's default (contiguous) memory format;
* ``kdx``: ``Trainer.fit`` on the real ``DistillationModule`` with the configured method (Lightning's
  loop, the method strategy, logging and the NaN check are all in the measured step), built like
  kdx-train builds it: ``channels_last=auto`` puts conv models in channels_last on a CPU
  (``channels_last=false`` measures kdx in the plain loop's layout);
* ``variants``, each kdx with one switch on: ``cache`` (``teacher.cache=exact``: the random batches
  are a deterministic view; the teacher's outputs are read from the cache, filled before the timed
  steps; it also runs ``plain_precomputed``, the plain loop with the teacher's logits computed before
  the timed steps: what skipping the teacher alone gives), ``channels_last``, ``compile``
  (torch.compile of student and teacher; compiled during warm-up), ``bf16``
  (``precision=bf16-mixed``). Their ratios are over the plain fp32 loop.

Overhead (``overhead.*``: MLP student, CNN1D teacher, batch 32, one thread, near-zero compute):
the median step time of the plain loop, of a bare LightningModule doing the same KD step (no
logging: Lightning's floor), and of kdx's module; ``overhead_ms_over_lightning`` = kdx − bare,
``overhead_ms_over_plain`` = kdx − plain, each the median over rounds of the paired differences.

Also reported: the time share of the method's loss inside the kdx step: the time ``method.loss``
takes on the timed steps' batches (measured after the fit, outside the timed steps, so nothing in
the module is wrapped) over the time of those steps. Prints a table and one JSON
line. Never used as an assert in tests (the machine's load decides the figures).

``pair=text`` measures the text pair instead (:mod:`kdx.bench_text`: BERTs on SST-2-shaped token
batches, kdx against the plain loop and what length grouping gains), ``pair=lm`` the language-model
pair (:mod:`kdx.bench_lm`: tiny GPT-2s, kdx's ``fkl`` step against the plain loop, the top-k cached
step against the live teacher, the top-k cache's size and error); every pair other than this
module's image pair is a module listed in :data:`PAIRS`.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m kdx.bench`: the console script's front door, before torch
    from kdx.front_door import front_door, launch

    front_door("bench")

import contextlib
import copy
import json
import statistics
import tempfile
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch.utils.data import DataLoader

import kdx.methods  # noqa: F401 - registers method schemas
from kdx import bench_lm, bench_text
from kdx.bench_loop import (
    BareKD,
    _clock,
    _kd_step,
    _StepTimer,
    _sync,
    _trainer,
    _use_clock,
    median_step,
    timed_loop,
)
from kdx.console import configure_console
from kdx.data.base import KDDataModule, tensor_dataset
from kdx.methods.kd import KD
from kdx.models.small import CNN1D, MLP
from kdx.pipeline.build import make_module
from kdx.pipeline.compose import CONFIG_DIR
from kdx.pipeline.switches import apply_cpu_allocator, resolve_channels_last
from kdx.teacher_outputs import TeacherOutputCache
from kdx.utils import json_safe

VARIANTS = ("cache", "channels_last", "compile", "bf16")


# `pair=<name>`: each pair besides the image pair (this module) is a module with
# bench(cfg, device) -> dict and table(dict) -> str
PAIRS: dict[str, Any] = {"image": None, "text": bench_text, "lm": bench_lm}


def method_loss_seconds(module, batches: list[Any], device: torch.device) -> float:
    """The time ``method.loss`` takes on ``batches``, each given the student's and the teacher's outputs
    as the training step gives them (train mode, with gradient, in the trainer's precision).

    Measured after ``fit``, outside the timed steps, on the very batches those steps trained on, so
    the module and its method run unchanged while they are timed."""
    method = module.method
    ctx = module.step_context()
    module.train()
    seconds = 0.0
    with torch.enable_grad(), module.trainer.precision_plugin.forward_context():
        for x, y, index in batches:
            student_out = ctx.student(x, method.reads)
            teacher_out = method.teacher_forward(ctx, x)
            _sync(device)
            start = _clock()
            method.loss(student_out, teacher_out, y, index)
            _sync(device)
            seconds += _clock() - start
    return seconds


def _data(seed: int, n: int, input_shape, num_classes: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *input_shape, generator=generator)
    y = torch.randint(0, num_classes, (n,), generator=generator)
    return tensor_dataset(x, y)


class RandomBatches(KDDataModule):
    """The bench's fixed random batches as a kdx data module: training only, in order, full batches
    (the plain loop's batches, one for one); a deterministic view, which ``teacher.cache=exact`` reads."""

    def __init__(self, dataset, batch_size: int, input_shape, num_classes: int):
        super().__init__(batch_size=batch_size, drop_last=True)
        self.dataset, self.input_shape, self.num_classes = dataset, tuple(input_shape), int(num_classes)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self.dataset

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, drop_last=True)


def kdx_segment(cfg, student, teacher, device, variant: str | None = None, cache_dir: str | None = None):
    """samples/s and the loss's share of the step, for kdx with one variant switched on (or none)."""
    method = instantiate(cfg.method)
    vcfg = copy.deepcopy(cfg)
    with open_dict(vcfg):
        # the cache is the `cache` variant's alone; the bench's random batches are a deterministic
        # training view: exact mode, in this bench's own temporary cache folder
        vcfg.teacher.cache = "exact" if variant == "cache" else "off"
        vcfg.paths.cache_dir = cache_dir
        if variant in ("channels_last", "compile"):
            vcfg[variant] = True
    if variant == "cache":
        TeacherOutputCache.check_method(method)
    module = make_module(vcfg, student, method, teacher)
    dataset = _data(
        cfg.seed, cfg.batch_size * (cfg.warmup_steps + cfg.steps), cfg.input_shape, cfg.num_classes
    )
    # the loss share is kdx's own figure: measured on the plain kdx side only
    timer = _StepTimer(cfg.warmup_steps, device, epoch=cfg.warmup_epochs, keep_batches=variant is None)
    precision = "bf16-mixed" if variant == "bf16" else None
    trainer = _trainer(cfg, timer, cfg.warmup_epochs + 1, precision)
    trainer.fit(module, datamodule=RandomBatches(dataset, cfg.batch_size, cfg.input_shape, cfg.num_classes))
    seconds = timer.end - timer.start
    loss_seconds = method_loss_seconds(module, timer.batches, device) if variant is None else 0.0
    return timer.samples / seconds, loss_seconds / seconds


def plain_segment(
    cfg,
    student,
    teacher,
    device,
    warmup: int,
    dataset,
    batch_size: int,
    precision: str,
    precomputed: bool = False,
):
    """samples/s and the median step time (ms) of the hand-written loop. ``precomputed``: the teacher's
    logits of every batch are computed before the timed loop and read from a list, the ceiling any
    teacher-output cache can reach on these models."""
    student.to(device).train()
    teacher.to(device).eval().requires_grad_(False)
    optimizer = instantiate(cfg.optim.optimizer)(student.parameters())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    stored: list[torch.Tensor | None] = [None] * len(loader)
    if precomputed:
        with torch.no_grad():
            stored = [teacher(x.to(device)) for x, _, _ in loader]
    samples = 0

    def step(i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        nonlocal samples
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            loss = _kd_step(student, teacher, x, y, stored[i])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        samples += x.shape[0] if i >= warmup else 0

    stamps = timed_loop(loader, step, warmup, device)
    return samples / (stamps[-1] - stamps[0]), 1000 * median_step(stamps)


def overhead(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """kdx's fixed per-step cost over the plain loop and over a bare LightningModule (ms)."""
    ocfg = cfg.overhead
    shape, classes, batch = (1, 40), 10, int(ocfg.batch_size)
    student0, teacher0 = MLP(classes, shape), CNN1D(classes, shape)
    dataset = _data(cfg.seed, batch * (ocfg.warmup_steps + ocfg.steps), shape, classes)
    optimizer = instantiate(cfg.optim.optimizer)
    # kdx's module as the builder makes it: KD, this optimizer, no scheduler, contiguous, not compiled
    kdx_cfg = OmegaConf.create(
        {"dataset": {"num_classes": classes}, "student": {}, "teacher": {"cache": "off"}}
    )
    times: dict[str, list[float]] = {"plain": [], "lightning": [], "kdx": []}
    sides = list(times)
    for round_ in range(int(ocfg.rounds)):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            student, teacher = copy.deepcopy(student0), copy.deepcopy(teacher0)
            if side == "plain":
                times[side].append(
                    plain_segment(
                        cfg, student, teacher, device, ocfg.warmup_steps, dataset, batch, "32-true"
                    )[1]
                )
                continue
            if side == "lightning":
                module: L.LightningModule = BareKD(student, teacher, optimizer)
            else:
                module = make_module(
                    kdx_cfg,
                    student,
                    KD(),
                    teacher,
                    optim=OmegaConf.create({"optimizer": cfg.optim.optimizer}),
                )
            timer = _StepTimer(int(ocfg.warmup_steps), device)
            _trainer(cfg, timer, 1, "32-true").fit(
                module, datamodule=RandomBatches(dataset, batch, shape, classes)
            )
            times[side].append(timer.step_ms())
    median = {side: statistics.median(values) for side, values in times.items()}
    paired = lambda other: statistics.median(k - o for k, o in zip(times["kdx"], times[other]))  # noqa: E731
    return {
        "overhead_batch_size": batch,
        "step_ms_plain": round(median["plain"], 4),
        "step_ms_lightning": round(median["lightning"], 4),
        "step_ms_kdx": round(median["kdx"], 4),
        "overhead_ms_over_plain": round(paired("plain"), 4),
        "overhead_ms_over_lightning": round(paired("lightning"), 4),
        "overhead_rounds": int(ocfg.rounds),
    }


def bench(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, verbose=False)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    device = torch.device(
        "cuda" if cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"
    )
    clock = _use_clock(cfg, device)
    pair = str(cfg.get("pair", "image"))
    if pair not in PAIRS:
        raise ValueError(f"pair={pair!r}: choose one of {', '.join(PAIRS)}")
    # before any side allocates: every side runs under the allocator policy kdx-train sets
    allocator = str(cfg.get("cpu_allocator", "retain"))
    memory = {"cpu_allocator": allocator, "freed_memory_retained": apply_cpu_allocator(allocator)}
    if pair != "image":
        return {**PAIRS[pair].bench(cfg, device), "clock": clock, **memory}
    return {**bench_image(cfg, device, clock), **memory}


def bench_image(cfg: DictConfig, device: torch.device, clock: str) -> dict:
    """The image pair (``cfg.teacher`` → ``cfg.student`` on random image batches)."""
    variants = [str(v) for v in (cfg.get("variants") or [])]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"variants={unknown} unknown; choose from {list(VARIANTS)}")
    # `kdx-bench teacher.cache=exact` (or auto) asks for the cached side; the bench's random batches are
    # a deterministic view, so exact is the one mode it can measure
    cache_mode = str(cfg.teacher.get("cache", "off"))
    if cache_mode == "views":
        raise ValueError(
            "teacher.cache=views: kdx-bench's batches are fixed random tensors with no augmentation to "
            "replay; measure the cache with teacher.cache=exact (or variants=[cache])"
        )
    if cache_mode in ("exact", "auto") and "cache" not in variants:
        variants.append("cache")
    student0, teacher0 = instantiate(cfg.student.model), instantiate(cfg.teacher.model)
    # kdx's memory format as kdx-train would pick it here (channels_last=auto: on for conv models on a CPU)
    layout = resolve_channels_last(cfg, student0, teacher0)
    rates: dict[str, list[float]] = {"plain": [], "kdx": [], **{v: [] for v in variants}}
    if "cache" in variants:  # the cache's ceiling: the plain loop with the teacher's logits precomputed
        rates["plain_precomputed"] = []
    shares: list[float] = []
    sides = list(rates)
    dataset = _data(
        cfg.seed, cfg.batch_size * (cfg.warmup_steps + cfg.steps), cfg.input_shape, cfg.num_classes
    )
    with tempfile.TemporaryDirectory(prefix="kdx-bench-") as cache_dir:
        for round_ in range(cfg.rounds):
            for side in sides if round_ % 2 == 0 else sides[::-1]:
                student, teacher = copy.deepcopy(student0), copy.deepcopy(teacher0)
                if side in ("plain", "plain_precomputed"):
                    rate, _ = plain_segment(
                        cfg,
                        student,
                        teacher,
                        device,
                        cfg.warmup_steps,
                        dataset,
                        cfg.batch_size,
                        cfg.precision,
                        precomputed=side == "plain_precomputed",
                    )
                    rates[side].append(rate)
                    continue
                rate, share = kdx_segment(
                    cfg, student, teacher, device, None if side == "kdx" else side, cache_dir
                )
                rates[side].append(rate)
                if side == "kdx":
                    shares.append(share)
    median = {side: statistics.median(values) for side, values in rates.items()}
    plain = median["plain"]
    result: dict[str, Any] = {
        "method": instantiate(cfg.method).name,
        "teacher": cfg.teacher.name,
        "student": cfg.student.name,
        "batch_size": cfg.batch_size,
        "num_classes": cfg.num_classes,
        "device": device.type,
        "precision": cfg.precision,
        "threads": torch.get_num_threads(),
        "kdx_channels_last": bool(layout),
        "clock": clock,
        "kdx_samples_per_s": round(median["kdx"], 2),
        "plain_kd_samples_per_s": round(plain, 2),
        "ratio_kdx_over_plain_kd": round(median["kdx"] / plain, 4),
        "method_loss_share_of_step": round(statistics.median(shares), 4),
    }
    names = {"cache": "cached", "channels_last": "channels_last", "compile": "compiled", "bf16": "bf16"}
    for variant in variants:
        result[f"{names[variant]}_samples_per_s"] = round(median[variant], 2)
        result[f"ratio_{names[variant]}_over_plain_kd"] = round(median[variant] / plain, 4)
    if "plain_precomputed" in median:
        result["plain_precomputed_samples_per_s"] = round(median["plain_precomputed"], 2)
        result["ratio_plain_precomputed_over_plain_kd"] = round(median["plain_precomputed"] / plain, 4)
        result["ratio_cached_over_plain_precomputed"] = round(
            median["cache"] / median["plain_precomputed"], 4
        )
    result.update({"rounds": cfg.rounds, "steps_per_segment": cfg.steps})
    if cfg.overhead.get("enabled", True):
        result.update(overhead(cfg, device))
    return result


def table(result: dict[str, Any]) -> str:
    """The human-readable lines printed above the JSON line."""
    if result.get("pair", "image") != "image":
        return PAIRS[result["pair"]].table(result)
    layout = "channels_last" if result.get("kdx_channels_last") else "contiguous"
    lines = [
        f"kdx sides in the {layout} memory format (channels_last={layout == 'channels_last'}); plain: contiguous"
    ]
    lines.append(f"{'side':<34}{'samples/s':>12}{'/ plain':>10}")
    lines.append(
        f"{'plain PyTorch (kd, live teacher)':<34}{result['plain_kd_samples_per_s']:>12.1f}{1:>10.3f}"
    )
    rows = [
        (f"kdx ({result['method']})", "kdx_samples_per_s", "ratio_kdx_over_plain_kd"),
        ("kdx + teacher cache", "cached_samples_per_s", "ratio_cached_over_plain_kd"),
        ("kdx + channels_last", "channels_last_samples_per_s", "ratio_channels_last_over_plain_kd"),
        ("kdx + torch.compile", "compiled_samples_per_s", "ratio_compiled_over_plain_kd"),
        ("kdx + bf16-mixed", "bf16_samples_per_s", "ratio_bf16_over_plain_kd"),
    ]
    for label, rate, ratio in rows:
        if rate in result:
            lines.append(f"{label:<34}{result[rate]:>12.1f}{result[ratio]:>10.3f}")
        else:
            lines.append(f"{label:<34}{'-':>12}{'-':>10}   (add it to variants=[...])")
    if "plain_precomputed_samples_per_s" in result:
        lines.append(
            f"{'plain, teacher logits precomputed':<34}{result['plain_precomputed_samples_per_s']:>12.1f}"
            f"{result['ratio_plain_precomputed_over_plain_kd']:>10.3f}   (what skipping the teacher alone "
            f"gives; kdx + cache is {100 * result['ratio_cached_over_plain_precomputed']:.1f}% of it)"
        )
    lines.append(f"method loss share: {100 * result['method_loss_share_of_step']:.2f}% of the kdx step")
    if "overhead_ms_over_lightning" in result:
        lines.append(
            f"fixed per-step cost at batch {result['overhead_batch_size']} (MLP <- CNN1D): plain "
            f"{result['step_ms_plain']:.3f} ms, bare Lightning {result['step_ms_lightning']:.3f} ms, "
            f"kdx {result['step_ms_kdx']:.3f} ms"
        )
        lines.append(
            f"kdx overhead: {result['overhead_ms_over_lightning']:+.3f} ms/step over Lightning, "
            f"{result['overhead_ms_over_plain']:+.3f} ms/step over the plain loop"
        )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench")
def main(cfg: DictConfig) -> None:
    configure_console()  # Lightning's routine notices stay in the log file
    with contextlib.suppress(Exception):
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    result = bench(cfg)
    print(table(result))
    # a variant that could not run reports NaN: null keeps the line strict JSON for whatever parses it
    print(json.dumps(json_safe(result), allow_nan=False))


if __name__ == "__main__":
    launch("bench", main)
