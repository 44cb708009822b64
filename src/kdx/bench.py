"""``kdx-bench``: samples/s of kdx's real training step against a plain PyTorch loop.

Both run in this process on the same student, teacher, random batch stream and optimizer recipe,
in alternating segments after warm-up. The kdx side is ``Trainer.fit`` on the real
``DistillationModule`` with the configured method (so Lightning's loop, the method strategy,
logging and the NaN check are all in the measured step); the plain side is a hand-written loop
with Hinton KD (0.1·CE + 0.9·T²·KL at T=4). Also reported: the time share of the method's loss
inside the kdx step. Prints a table and one JSON line. Never used as an assert in tests.
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader

import kdx.methods  # noqa: F401 - registers method schemas
from kdx.data.base import tensor_dataset
from kdx.factory import build_module
from kdx.train import CONFIG_DIR


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _LossTimer:
    """Wraps ``method.loss`` to add up the time spent in it."""

    def __init__(self, method, device: torch.device):
        self.method, self.device, self.seconds = method, device, 0.0
        self.inner = method.loss
        method.loss = self

    def __call__(self, *args, **kwargs):
        _sync(self.device)
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        _sync(self.device)
        self.seconds += time.perf_counter() - start
        return out


class _StepTimer(L.Callback):
    """Times the steps of the last epoch after its first ``warmup`` batches."""

    def __init__(self, warmup: int, device: torch.device, loss_timer: _LossTimer, epoch: int = 0):
        self.warmup, self.device, self.loss_timer, self.epoch = warmup, device, loss_timer, epoch
        self.start = self.end = 0.0
        self.samples = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.warmup:
            _sync(self.device)
            self.loss_timer.seconds = 0.0
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx >= self.warmup:
            self.samples += batch[1].shape[0]
            _sync(self.device)
            self.end = time.perf_counter()


def _loader(cfg: DictConfig, n: int) -> DataLoader:
    generator = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(n, *cfg.input_shape, generator=generator)
    y = torch.randint(0, cfg.num_classes, (n,), generator=generator)
    return DataLoader(tensor_dataset(x, y), batch_size=cfg.batch_size, shuffle=False, drop_last=True)


def kdx_segment(cfg, student, teacher, device) -> tuple[float, float]:
    method = instantiate(cfg.method)
    module = build_module(cfg, student, method, teacher)
    loader = _loader(cfg, cfg.batch_size * (cfg.warmup_steps + cfg.steps))
    loss_timer = _LossTimer(method, device)
    timer = _StepTimer(cfg.warmup_steps, device, loss_timer, epoch=cfg.warmup_epochs)
    trainer = L.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        precision=cfg.precision,
        max_epochs=cfg.warmup_epochs + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    # a datamodule with input_shape: methods that size connectors by probing (rdim, fitnet, ...) read it
    datamodule = L.LightningDataModule()
    datamodule.input_shape = tuple(cfg.input_shape)
    datamodule.train_dataloader = lambda: loader
    trainer.fit(module, datamodule=datamodule)
    seconds = timer.end - timer.start
    return timer.samples / seconds, loss_timer.seconds / seconds


def plain_segment(cfg, student, teacher, device) -> float:
    student.to(device).train()
    teacher.to(device).eval().requires_grad_(False)
    optimizer = instantiate(cfg.optim.optimizer)(student.parameters())
    loader = _loader(cfg, cfg.batch_size * (cfg.warmup_steps + cfg.steps))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision.startswith("bf16"))
    samples, start = 0, 0.0
    for step, (x, y, _) in enumerate(loader):
        if step == cfg.warmup_steps:
            _sync(device)
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast:
            logits = student(x)
            with torch.no_grad():
                teacher_logits = teacher(x)
            kl = F.kl_div(
                F.log_softmax(logits / 4, -1), F.softmax(teacher_logits / 4, -1), reduction="batchmean"
            )
            loss = 0.1 * F.cross_entropy(logits, y) + 0.9 * 16 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= cfg.warmup_steps:
            samples += x.shape[0]
    _sync(device)
    return samples / (time.perf_counter() - start)


def bench(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, verbose=False)
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    device = torch.device(
        "cuda" if cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"
    )
    student0, teacher0 = instantiate(cfg.student.model), instantiate(cfg.teacher.model)
    kdx_rates, plain_rates, shares = [], [], []
    for round_ in range(cfg.rounds):
        order = ("kdx", "plain") if round_ % 2 == 0 else ("plain", "kdx")
        for side in order:
            student, teacher = copy.deepcopy(student0), copy.deepcopy(teacher0)
            if side == "kdx":
                rate, share = kdx_segment(cfg, student, teacher, device)
                kdx_rates.append(rate)
                shares.append(share)
            else:
                plain_rates.append(plain_segment(cfg, student, teacher, device))
    kdx_rate, plain_rate = statistics.median(kdx_rates), statistics.median(plain_rates)
    method = instantiate(cfg.method).name
    return {
        "method": method,
        "teacher": cfg.teacher.name,
        "student": cfg.student.name,
        "batch_size": cfg.batch_size,
        "num_classes": cfg.num_classes,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "kdx_samples_per_s": round(kdx_rate, 2),
        "plain_kd_samples_per_s": round(plain_rate, 2),
        "ratio_kdx_over_plain_kd": round(kdx_rate / plain_rate, 4),
        "method_loss_share_of_step": round(statistics.median(shares), 4),
        "rounds": cfg.rounds,
        "steps_per_segment": cfg.steps,
    }


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench")
def main(cfg: DictConfig) -> None:
    result = bench(cfg)
    print(f"kdx ({result['method']}) : {result['kdx_samples_per_s']:10.1f} samples/s")
    print(f"plain PyTorch (kd)      : {result['plain_kd_samples_per_s']:10.1f} samples/s")
    print(f"ratio kdx / plain kd    : {result['ratio_kdx_over_plain_kd']:.3f}")
    print(f"method loss share       : {100 * result['method_loss_share_of_step']:.2f}% of the step")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
