"""The pre-training phase of AB, FT and FSP (RepDistiller's ``--init_epochs``) as its own step:
init epochs first with their own optimizer and no schedule, then the full main schedule with a
fresh optimizer and the row's milestones; resume in either phase."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from conftest import compose_train
from kdx.pipeline.build import build
from kdx.pipeline.fit import fit, make_callbacks, make_loggers
from kdx.pipeline.pretrain import PretrainModule
from kdx.pipeline.validate import validate_config

ROW = "experiment=crd_cifar100/resnet56_resnet20"


@pytest.mark.parametrize("method", ["ab", "ft", "fsp"])
def test_a_crd_row_pretrains_30_epochs_then_runs_its_full_schedule(method, tmp_path, cache_dir):
    cfg = compose_train([ROW, f"method={method}"], tmp_path, cache_dir)
    assert cfg.method.init_epochs == 30
    assert cfg.trainer.max_epochs == 240 and list(cfg.optim.scheduler.milestones) == [150, 180, 210]


class Schedule(L.Callback):
    """Records, at each training epoch's start, the phase, the epoch, the lr and whether the
    optimizer already holds momentum; ``stop_at=(phase, epoch)`` raises there (a kill)."""

    in_pretraining = True  # kdx.pipeline.fit hands it to the pre-training fit too

    def __init__(self, stop_at: tuple[str, int] | None = None):
        self.epochs: list[tuple[str, int, float, bool]] = []
        self.optimizers: dict[str, set[int]] = {"init": set(), "main": set()}
        self.stop_at = stop_at

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        phase = "init" if isinstance(pl_module, PretrainModule) else "main"
        if (phase, trainer.current_epoch) == self.stop_at:
            raise RuntimeError(f"killed at {phase} epoch {trainer.current_epoch}")
        optimizer = trainer.optimizers[0]
        self.optimizers[phase].add(id(optimizer))
        momentum = any("momentum_buffer" in s for s in optimizer.state.values())
        self.epochs.append((phase, trainer.current_epoch, optimizer.param_groups[0]["lr"], momentum))


def _scaled_row(method: str, tmp_path, cache_dir, *extra: str):
    """The CRD row, its epochs scaled down (2 init + 3 main, milestones 1 and 2), on tiny synthetic
    CIFAR with a stored random teacher (no teacher training)."""
    teacher_file = cache_dir / "random_resnet56.pt"
    overrides = [
        ROW,
        f"method={method}",
        "dataset=synthetic_cifar",
        "dataset.datamodule.num_train=32",
        "dataset.datamodule.num_val=16",
        "dataset.datamodule.num_test=16",
        "dataset.datamodule.batch_size=16",
        "method.init_epochs=2",
        "trainer.max_epochs=3",
        "optim.scheduler.milestones=[1,2]",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "logger=csv",
        f"teacher.ckpt={teacher_file}",
        "teacher.min_acc=0",
        *extra,
    ]
    cfg = compose_train(overrides, tmp_path, cache_dir)
    if not teacher_file.is_file():
        torch.manual_seed(0)
        teacher = instantiate(cfg.teacher.model)
        # BatchNorm statistics of the data's scale, so that the random teacher's features are of a
        # trained one's order (eval-mode BN with its initial statistics lets a deep ResNet's grow ~1e7)
        for module in teacher.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = None  # a cumulative average over the batches below
        datamodule = instantiate(cfg.dataset.datamodule)
        datamodule.setup("fit")
        with torch.no_grad():
            teacher.train()
            for x, *_ in datamodule.train_dataloader():
                teacher(x)
        torch.save(teacher.state_dict(), teacher_file)
    return cfg


def _fit(cfg, recorder: Schedule) -> None:
    validate_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    parts = build(cfg)
    fit(cfg, parts, [*make_callbacks(cfg), recorder], make_loggers(cfg, "pretrain-test"))


@pytest.mark.parametrize("method", ["ab", "ft", "fsp"])
def test_the_scaled_row_runs_init_then_main_with_a_fresh_optimizer(method, tmp_path, cache_dir):
    cfg = _scaled_row(method, tmp_path, cache_dir)
    recorder = Schedule()
    _fit(cfg, recorder)
    lr = 0.05  # the row's student lr; FT's paraphraser pre-trains at 0.01 for a ResNet student
    init_lr = 0.01 if method == "ft" else lr
    # init: 2 epochs at a constant lr; main: all 3 epochs from epoch 0, decayed at 1 and 2
    expected = [
        ("init", 0, init_lr),
        ("init", 1, init_lr),
        ("main", 0, lr),
        ("main", 1, lr / 10),
        ("main", 2, lr / 100),
    ]
    assert [(p, e, pytest.approx(v)) for p, e, v, _ in recorder.epochs] == expected
    # the main phase starts without the pre-training optimizer's momentum
    assert recorder.epochs[2][3] is False and recorder.epochs[1][3] is True
    assert len(recorder.optimizers["init"]) == 1 and recorder.optimizers["init"].isdisjoint(
        recorder.optimizers["main"]
    )
    assert (tmp_path / "checkpoints" / "init" / "last.ckpt").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def _with_ckpt(cfg, path):
    with open_dict(cfg):
        cfg.ckpt_path = str(path)
    return cfg


def test_a_run_killed_in_pretraining_resumes_there_then_runs_the_main_phase(tmp_path, cache_dir):
    cfg = _scaled_row("ab", tmp_path, cache_dir)
    with pytest.raises(RuntimeError, match="killed at init epoch 1"):
        _fit(cfg, Schedule(stop_at=("init", 1)))
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # the main phase never started
    recorder = Schedule()
    _fit(_with_ckpt(cfg, tmp_path / "checkpoints" / "init" / "last.ckpt"), recorder)
    assert [(p, e) for p, e, _, _ in recorder.epochs] == [("init", 1), ("main", 0), ("main", 1), ("main", 2)]
    assert recorder.epochs[0][3] is True  # the pre-training optimizer's state came back with it


def test_a_run_killed_in_the_main_phase_resumes_there_without_pretraining_again(tmp_path, cache_dir):
    cfg = _scaled_row("ab", tmp_path, cache_dir)
    with pytest.raises(RuntimeError, match="killed at main epoch 1"):
        _fit(cfg, Schedule(stop_at=("main", 1)))
    recorder = Schedule()
    _fit(_with_ckpt(cfg, tmp_path / "checkpoints" / "last.ckpt"), recorder)
    assert [(p, e, pytest.approx(v)) for p, e, v, _ in recorder.epochs] == [
        ("main", 1, 0.005),
        ("main", 2, 0.0005),
    ]


def test_the_run_record_says_how_long_and_at_which_lr_it_pretrained(tmp_path, cache_dir):
    from kdx.pipeline.run import run

    cfg = _scaled_row("ft", tmp_path, cache_dir, "+trainer.limit_train_batches=1")
    metrics = run(cfg)
    # one batch of 16 images of 100 classes a epoch, from a random teacher: the student learns nothing
    # and its record says so (status no_learning); its figures are recorded all the same
    assert metrics["status"] == "no_learning" and metrics["init/epochs"] == 2
    assert metrics["init/lr"] == pytest.approx(0.01) and metrics["epochs"] == 3
