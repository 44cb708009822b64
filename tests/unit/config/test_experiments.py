"""Every experiment config composes and pins its recipe and published numbers; one CRD row runs end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import CONF_DIR, FAST, compose_train, run_train

EXPERIMENTS = sorted(
    str(p.relative_to(Path(CONF_DIR) / "experiment").with_suffix(""))
    for p in (Path(CONF_DIR) / "experiment").rglob("*.yaml")
    if not p.name.startswith("_")
)

# The RepDistiller README's rows (docs/reproduce.md, conf/experiment/crd_cifar100/): teacher, scratch, KD, CRD (%).
CRD_ROWS = {
    "wrn_40_2_wrn_16_2": (75.61, 73.26, 74.92, 75.48),
    "wrn_40_2_wrn_40_1": (75.61, 71.98, 73.54, 74.14),
    "resnet56_resnet20": (72.34, 69.06, 70.66, 71.16),
    "resnet110_resnet20": (74.31, 69.06, 70.67, 71.46),
    "resnet110_resnet32": (74.31, 71.14, 73.08, 73.48),
    "resnet32x4_resnet8x4": (79.42, 72.50, 73.33, 75.51),
    "vgg13_vgg8": (74.64, 70.36, 72.98, 73.94),
    "vgg13_mobile_half": (74.64, 64.60, 67.37, 69.73),
    "resnet50_cifar_mobile_half": (79.34, 64.60, 67.35, 69.11),
    "resnet50_cifar_vgg8": (79.34, 70.36, 73.81, 74.30),
    "resnet32x4_shufflenetv1": (79.42, 70.50, 74.07, 75.11),
    "resnet32x4_shufflenetv2": (79.42, 71.82, 74.45, 75.65),
    "wrn_40_2_shufflenetv1": (75.61, 70.50, 74.83, 76.05),
}
SMALL_LR_STUDENTS = {"mobile_half", "shufflenetv1", "shufflenetv2"}


def test_experiment_list_is_complete():
    assert {f"crd_cifar100/{row}" for row in CRD_ROWS} <= set(EXPERIMENTS)
    assert {"kda_cifar100/resnet34_resnet18", "mnist1d/table"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment, tmp_path, cache_dir):
    cfg = compose_train([f"experiment={experiment}"], tmp_path, cache_dir)
    assert cfg.teacher.name and cfg.student.name and cfg.method._target_
    # the models and the method can be built from the composed config
    instantiate(cfg.method)
    if cfg.dataset.name == "cifar100":
        # every CIFAR-100 row says which figure its source reports (RepDistiller: the last epoch;
        # KDA: unsettled, both shown); none compares on a fixed metric any more
        assert "metric" not in cfg.published and cfg.published.units == "percent"
        assert cfg.published.reported == ("unsettled" if "kda" in experiment else "last")
        assert cfg.published.tolerance > 0 and "seeds" in cfg.published


@pytest.mark.parametrize("row", sorted(CRD_ROWS))
def test_crd_row_pins_recipe_and_published_numbers(row, tmp_path, cache_dir):
    cfg = compose_train([f"experiment=crd_cifar100/{row}"], tmp_path, cache_dir)
    assert f"{cfg.teacher.name}_{cfg.student.name}" == row
    teacher, scratch, kd, crd = CRD_ROWS[row]
    pub = cfg.published
    assert (pub.teacher, pub.student.none, pub.student.kd, pub.student.crd) == (teacher, scratch, kd, crd)
    # the recipe
    assert cfg.dataset.name == "cifar100" and cfg.dataset.datamodule.batch_size == 64
    assert cfg.dataset.datamodule.val_fraction == 0.0  # validation = test set, as RepDistiller
    assert cfg.trainer.max_epochs == 240
    opt, sched = cfg.optim.optimizer, cfg.optim.scheduler
    assert opt._target_ == "torch.optim.SGD" and opt.momentum == 0.9 and opt.weight_decay == 5e-4
    assert opt.lr == (0.01 if cfg.student.name in SMALL_LR_STUDENTS else 0.05)
    assert list(sched.milestones) == [150, 180, 210] and sched.gamma == 0.1
    assert cfg.method._target_ == "kdx.methods.kd.KD"
    assert (
        (cfg.method.temperature, cfg.method.alpha) == (pub.recipe.temperature, pub.recipe.alpha) == (4.0, 0.9)
    )
    assert cfg.teacher.ckpt == "auto" and cfg.teacher.train.epochs == 240


def test_method_override_keeps_the_recipe(tmp_path, cache_dir):
    base = compose_train(["experiment=crd_cifar100/resnet32x4_shufflenetv1"], tmp_path, cache_dir)
    other = compose_train(
        ["experiment=crd_cifar100/resnet32x4_shufflenetv1", "method=none"], tmp_path, cache_dir
    )
    assert other.method._target_ == "kdx.methods.none.NoDistillation"
    for key in ("optim", "dataset", "trainer", "teacher", "student", "published"):
        assert other[key] == base[key], key


def test_kda_experiment(tmp_path, cache_dir):
    cfg = compose_train(["experiment=kda_cifar100/resnet34_resnet18"], tmp_path, cache_dir)
    assert (cfg.teacher.name, cfg.student.name) == ("resnet34_cifar", "resnet18_cifar")
    assert cfg.dataset.datamodule.batch_size == 256 and cfg.trainer.max_epochs == 120
    assert (cfg.method.alpha, cfg.method.warm, cfg.method.layer) == (0.04, 5, "embedding")
    assert cfg.method.kd_weight == 0.0 and cfg.method.ce_weight == 1.0
    opt = cfg.optim.optimizer
    assert (opt.lr, opt.momentum, opt.weight_decay) == (0.1, 0.9, 5e-4)
    assert cfg.optim.interval == "step" and cfg.optim.scheduler.warmup_epochs == cfg.method.warm == 5
    assert cfg.optim.scheduler.epochs == 120
    assert cfg.published.version == "v1" and cfg.published.student.kda == 79.6
    assert cfg.published.teacher == 80.3 and cfg.published.student.none == 77.2


def test_sgd_kda_schedule_warmup_then_cosine(tmp_path, cache_dir):
    """120 epochs × 2 iterations, warm = 5 epochs = 10 iterations: KDA's linear warm-up
    lr·max(1, it)/10, then a cosine from lr to 0 over the other 230 iterations, per iteration."""
    cfg = compose_train(["optim=sgd_kda", "method=kda", "trainer.max_epochs=120"], tmp_path, cache_dir)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = instantiate(cfg.optim.optimizer)([param])
    total, warm = 240, 10
    scheduler = instantiate(cfg.optim.scheduler)(optimizer, total_steps=total)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:warm] == pytest.approx([0.1 * max(1, it) / warm for it in range(warm)])
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == warm
    for step in (60, 125, 200):  # the decay follows 0.1·(1 + cos(π·progress))/2
        progress = (step - warm) / (total - warm)
        assert lrs[step] == pytest.approx(0.1 * (1 + math.cos(math.pi * progress)) / 2, rel=1e-9)
    assert lrs[-1] < 1e-4
    assert optimizer.param_groups[0]["momentum"] == 0.9
    # method.warm moves the warm-up with it
    cfg = compose_train(["optim=sgd_kda", "method=kda", "method.warm=2"], tmp_path, cache_dir)
    assert cfg.optim.scheduler.warmup_epochs == 2


def test_mnist1d_table_uses_the_papers_recipe(tmp_path, cache_dir):
    # Greydanus 2020: Adam lr 1e-2, batch 100, 6000 steps = 150 epochs of 4000 training samples
    cfg = compose_train(["experiment=mnist1d/table"], tmp_path, cache_dir)
    assert cfg.dataset.name == "mnist1d" and cfg.trainer.max_epochs == 150
    assert cfg.dataset.datamodule.batch_size == 100 and cfg.optim.optimizer.lr == 0.01
    train_part = round(cfg.dataset.datamodule.num_samples * 0.8)  # mnist1d's own 80/20 split
    assert train_part - round(cfg.dataset.datamodule.val_fraction * train_part) == 4000


@pytest.mark.slow
def test_crd_row_end_to_end_on_synthetic_cifar(tmp_path, cache_dir):
    tiny = [
        "dataset.datamodule.num_train=64",
        "dataset.datamodule.num_val=32",
        "dataset.datamodule.num_test=32",
        "dataset.datamodule.batch_size=32",
    ]
    metrics = run_train(
        ["experiment=crd_cifar100/resnet56_resnet20", "dataset=synthetic_cifar", *tiny, *FAST],
        tmp_path,
        cache_dir,
    )
    assert metrics["status"] == "ok" and metrics["method"] == "kd"
    assert (metrics["dataset"], metrics["teacher"], metrics["student"]) == (
        "synthetic_cifar",
        "resnet56",
        "resnet20",
    )
    assert 0.0 <= metrics["student/acc_best"] <= 1.0 and "fidelity/kl" in metrics


def test_sgd_kda_steps_per_iteration_in_a_run(tmp_path, cache_dir):
    """OneCycleLR gets total_steps from the run's length and is stepped exactly that often."""
    metrics = run_train(
        ["optim=sgd_kda", "debug=limit", "logger=csv", "trainer.accelerator=cpu"], tmp_path, cache_dir
    )
    assert metrics["status"] == "ok"
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert any(name.startswith("lr-SGD") for name in header)
