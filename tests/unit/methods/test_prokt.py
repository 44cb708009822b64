"""method=prokt (Shi et al. 2021): golden values, docs/methods.md §5 properties, checkpointing, end-to-end runs."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from conftest import CONF_DIR, FAST, compose_train, run_train
from kdx.context import StepContext
from kdx.methods.prokt import ProKT, teacher_kl
from kdx.models.adapter import as_feature_model
from kdx.models.small import CNN1D, MLP
from kdx.teacher import load_weights

LN2, LN3 = math.log(2), math.log(3)


@dataclass
class RecordingContext(StepContext):
    """A step context over plain PyTorch (SGD on each model) that records each forward's model and mode."""

    lr: float = 1.0
    calls: list[tuple[str, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.student, self.teacher = as_feature_model(self.student), as_feature_model(self.teacher)
        self.student_opt = torch.optim.SGD(self.student.parameters(), lr=self.lr)
        self.teacher_opt = torch.optim.SGD(self.teacher.parameters(), lr=self.lr)
        self.optimizers = lambda: [self.student_opt, self.teacher_opt]
        self.clip_gradients = self._clip_by_norm
        self.student.register_forward_pre_hook(lambda m, a: self.calls.append(("student", m.training)))
        self.teacher.register_forward_pre_hook(lambda m, a: self.calls.append(("teacher", m.training)))

    def _clip_by_norm(self, optimizer, gradient_clip_val, gradient_clip_algorithm):
        assert gradient_clip_algorithm == "norm"
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)


def recording_context(student: nn.Module, teacher: nn.Module, lr: float = 1.0) -> RecordingContext:
    return RecordingContext(student=student, teacher=teacher, lr=lr)


def bias_only(bias) -> nn.Module:
    layer = nn.Linear(2, 2, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return nn.Sequential(layer)


# -- golden values, by hand --------------------------------------------------------------------
#
# Two classes, one sample x = 0, label y = 0, so each model's logits are its bias and the weight
# gradient is 0. Student bias (0, 0): p_s = (1/2, 1/2). Teacher bias (ln3, 0): p_t = (3/4, 1/4).
# Teacher step, λ = 0.4, T = 1:
#   CE(z_t, 0) = −ln(3/4) = 2·ln2 − ln3
#   KL(p_s ‖ p_t) = 1/2·ln((1/2)/(3/4)) + 1/2·ln((1/2)/(1/4)) = ln2 − 1/2·ln3
#   L_T = 0.6·(2ln2 − ln3) + 0.4·(ln2 − 1/2·ln3) = 1.6·ln2 − 0.8·ln3
#   ∂L_T/∂z_t = 0.6·(p_t − e_0) + 0.4·(p_t − p_s) = 0.6·(−1/4, 1/4) + 0.4·(1/4, −1/4) = (−0.05, 0.05)
#   (norm 0.0707 < 1: no clipping); SGD, lr 1: teacher bias → (ln3 + 0.05, −0.05).
# Student step, α = 0.5, T = 1, towards the updated teacher p' = σ(ln3 + 0.1) = 3e^0.1 / (3e^0.1 + 1):
#   L_S = 0.5·ln2 + 0.5·KL(p' ‖ u),  KL(p' ‖ u) = p'·ln(2p') + (1 − p')·ln(2(1 − p'))
#   ∂L_S/∂z_s = 0.5·(p_s − e_0) + 0.5·(p_s − p') = (−p'/2, p'/2)  (norm p'/√2 ≈ 0.54 < 1)
#   SGD, lr 1: student bias → (p'/2, −p'/2).


def test_golden_teacher_then_student_step():
    method = ProKT(move_back_weight=0.4, alpha=0.5, temperature=1.0)
    ctx = recording_context(bias_only([0.0, 0.0]), bias_only([LN3, 0.0]))
    x, y = torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0])
    terms = method.training_step((x, y, torch.tensor([0])), ctx)

    assert terms["teacher/ce"].item() == pytest.approx(2 * LN2 - LN3, rel=1e-9)
    assert terms["teacher/kl"].item() == pytest.approx(LN2 - LN3 / 2, rel=1e-9)
    assert terms["teacher/loss"].item() == pytest.approx(1.6 * LN2 - 0.8 * LN3, rel=1e-9)
    teacher_bias = ctx.teacher.model[0].bias.detach()
    torch.testing.assert_close(teacher_bias, torch.tensor([LN3 + 0.05, -0.05], dtype=torch.float64))

    p = 3 * math.exp(0.1) / (3 * math.exp(0.1) + 1)
    kl = p * math.log(2 * p) + (1 - p) * math.log(2 * (1 - p))
    assert terms["ce"].item() == pytest.approx(LN2, rel=1e-9)
    assert terms["kd"].item() == pytest.approx(kl, rel=1e-9)
    assert terms["loss"].item() == pytest.approx(0.5 * LN2 + 0.5 * kl, rel=1e-9)
    student_bias = ctx.student.model[0].bias.detach()
    torch.testing.assert_close(student_bias, torch.tensor([p / 2, -p / 2], dtype=torch.float64))

    # the official order and modes: student snapshot (eval), teacher step (train),
    # teacher snapshot (eval), student step (train)
    assert ctx.calls == [("student", False), ("teacher", True), ("teacher", False), ("student", True)]


def test_golden_student_loss_temperature():
    # T = 2, α = 0.9, teacher logits (2·ln3, 0): p_t^T = (3/4, 1/4); student logits 0: p_s^T = u.
    # L_S = 0.1·CE(0, y) + 0.9·4·KL((3/4, 1/4) ‖ u) = 0.1·ln2 + 3.6·(3/4·ln3 − ln2)
    method = ProKT(alpha=0.9, temperature=2.0)
    terms = method.student_loss(
        torch.zeros(1, 2, dtype=torch.float64),
        torch.tensor([1]),
        torch.tensor([[2 * LN3, 0.0]], dtype=torch.float64),
    )
    assert terms["loss"].item() == pytest.approx(0.1 * LN2 + 3.6 * (0.75 * LN3 - LN2), rel=1e-9)


def test_teacher_gradient_clipping():
    # same set-up as the golden test; the teacher gradient (−0.05, 0.05) clipped to norm 0.01
    method = ProKT(move_back_weight=0.4, alpha=0.5, temperature=1.0, teacher_max_grad_norm=0.01)
    ctx = recording_context(bias_only([0.0, 0.0]), bias_only([LN3, 0.0]))
    method.training_step((torch.zeros(1, 2, dtype=torch.float64), torch.tensor([0]), torch.tensor([0])), ctx)
    step = 0.01 / math.sqrt(2)
    torch.testing.assert_close(
        ctx.teacher.model[0].bias.detach(), torch.tensor([LN3 + step, -step], dtype=torch.float64)
    )


# -- docs/methods.md §5 ----------------------------------------------------------------------


def _pair(dropout: float = 0.0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return MLP(10, (1, 40), dropout=dropout), CNN1D(10, (1, 40), channels=(8, 8, 8))


def test_each_step_touches_only_its_own_model():
    method = ProKT()
    ctx = recording_context(*_pair(), lr=0.1)
    x, y = torch.randn(16, 1, 40), torch.randint(0, 10, (16,))
    student_before = copy.deepcopy(ctx.student.state_dict())
    teacher_before = copy.deepcopy(ctx.teacher.state_dict())

    z_s = method.student_snapshot(ctx, x)
    method.teacher_step(ctx, x, y, z_s, ctx.teacher_opt)
    assert all(p.grad is None for p in ctx.student.parameters()), "the teacher step reached the student"
    assert all(p.grad is not None for p in ctx.teacher.parameters())
    assert all(torch.equal(v, student_before[k]) for k, v in ctx.student.state_dict().items())
    assert any(not torch.equal(v, teacher_before[k]) for k, v in ctx.teacher.state_dict().items())

    ctx.teacher_opt.zero_grad(set_to_none=True)
    teacher_after = copy.deepcopy(ctx.teacher.state_dict())
    z_t = method.teacher_snapshot(ctx, x)
    method.student_step(ctx, x, y, z_t, ctx.student_opt)
    assert all(p.grad is None for p in ctx.teacher.parameters()), "the student step reached the teacher"
    assert all(p.grad is not None for p in ctx.student.parameters())
    assert all(torch.equal(v, teacher_after[k]) for k, v in ctx.teacher.state_dict().items())
    assert any(not torch.equal(v, student_before[k]) for k, v in ctx.student.state_dict().items())


def test_snapshots_are_eval_mode_and_detached():
    method = ProKT()
    ctx = recording_context(*_pair(dropout=0.5))
    ctx.student.train(), ctx.teacher.train()
    x = torch.randn(8, 1, 40)
    a, b = method.student_snapshot(ctx, x), method.student_snapshot(ctx, x)
    assert torch.equal(a, b) and not a.requires_grad  # no dropout: eval
    assert ctx.student.training and ctx.teacher.training  # modes restored
    running = ctx.teacher.model.stages[0][1].running_mean.clone()
    method.teacher_snapshot(ctx, x)
    assert torch.equal(ctx.teacher.model.stages[0][1].running_mean, running)  # eval BN: stats untouched


def test_kl_direction_gradient_only_to_the_teacher():
    z_s = torch.randn(4, 5, requires_grad=True)
    z_t = torch.randn(4, 5, requires_grad=True)
    kl = teacher_kl(z_s, z_t)
    p_s, p_t = F.softmax(z_s, -1), F.softmax(z_t, -1)
    by_hand = (p_s * (p_s.log() - p_t.log())).sum(-1).mean()
    torch.testing.assert_close(kl, by_hand)
    kl.backward()
    assert z_s.grad is None
    # ∂KL(p_s ‖ softmax(z_t))/∂z_t = (p_t − p_s) / B
    torch.testing.assert_close(z_t.grad, (p_t - p_s).detach() / 4)


def test_lambda_zero_is_plain_cross_entropy():
    method = ProKT(move_back_weight=0.0, teacher_max_grad_norm=0.0)
    ctx = recording_context(*_pair(), lr=0.1)
    reference = copy.deepcopy(ctx.teacher)
    x, y = torch.randn(16, 1, 40), torch.randint(0, 10, (16,))
    terms = method.training_step((x, y, torch.arange(16)), ctx)
    assert ctx.calls[0] == ("teacher", True)  # no student snapshot when λ = 0
    assert [c for c in ctx.calls if c[0] == "student"] == [("student", True)]
    assert terms["teacher/loss"] == terms["teacher/ce"] and "teacher/kl" not in terms
    # the same update as plain CE fine-tuning of a copy
    reference.train()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    F.cross_entropy(reference(x).logits, y).backward()
    opt.step()
    for (name, p), q in zip(ctx.teacher.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_zero_init_heads_predict_uniform_at_step_zero():
    method = ProKT(zero_init_heads=True)
    student, teacher = (as_feature_model(m) for m in _pair())
    method.setup(student, teacher, None)
    x = torch.randn(8, 1, 40)
    with torch.no_grad():
        for model in (student, teacher):
            torch.testing.assert_close(F.softmax(model.eval()(x).logits, -1), torch.full((8, 10), 0.1))


def test_teacher_init_and_optimizers_from_an_optim_recipe():
    assert not ProKT().uses_teacher_weights()
    assert ProKT(teacher_init="checkpoint").uses_teacher_weights()
    teacher = nn.Linear(3, 2)
    calls = []

    def build_scheduler(factory, optimizer, interval):  # the module's horizon-filling builder
        calls.append(interval)
        return factory(optimizer, T_max=7)

    recipe = {
        "optimizer": partial(torch.optim.SGD, lr=0.2, momentum=0.9),
        "scheduler": partial(torch.optim.lr_scheduler.CosineAnnealingLR),
        "interval": "epoch",
    }
    (config,) = ProKT(teacher_optim=recipe).teacher_optimizers(teacher, build_scheduler)
    assert type(config["optimizer"]) is torch.optim.SGD and config["optimizer"].param_groups[0]["lr"] == 0.2
    assert config["lr_scheduler"]["interval"] == "epoch" and config["lr_scheduler"]["scheduler"].T_max == 7
    assert calls == ["epoch"]
    (config,) = ProKT(teacher_optim={**recipe, "scheduler": None}).teacher_optimizers(
        teacher, build_scheduler
    )
    assert "lr_scheduler" not in config and calls == ["epoch"]
    (config,) = ProKT().teacher_optimizers(teacher, build_scheduler)  # built by hand: Adam at 0.01
    assert type(config["optimizer"]) is torch.optim.Adam and config["optimizer"].param_groups[0]["lr"] == 0.01
    with pytest.raises(ValueError, match="teacher_init"):
        ProKT(teacher_init="converged")
    with pytest.raises(ValueError, match="teacher_snapshot"):
        ProKT(teacher_snapshot="ema")
    with pytest.raises(ValueError, match="optim recipe"):
        ProKT(teacher_optim={"optimizer": "adam"})


@pytest.mark.parametrize("snapshot", ["eval", "train"])
def test_teacher_snapshot_mode_and_untouched_statistics(snapshot):
    # a BatchNorm teacher: the train-mode snapshot normalises with the batch's statistics (so its
    # logits differ from the eval-mode ones), and neither snapshot moves the running statistics
    torch.manual_seed(0)
    teacher = as_feature_model(CNN1D(10, (1, 40), channels=(8, 8, 8)))
    ctx = StepContext(student=teacher, teacher=teacher)
    x = torch.randn(16, 1, 40) * 2 + 1
    buffers = {k: v.clone() for k, v in teacher.named_buffers()}
    teacher.train()
    logits = ProKT(teacher_snapshot=snapshot).teacher_snapshot(ctx, x)
    assert teacher.training  # the mode is restored
    assert all(torch.equal(v, buffers[k]) for k, v in teacher.named_buffers())
    with torch.no_grad():
        expected = teacher.train(snapshot == "train")(x).logits
    torch.testing.assert_close(logits, expected)
    with torch.no_grad():
        other = teacher.train(snapshot != "train")(x).logits
    assert not torch.allclose(logits, other)


# -- end to end through Hydra ------------------------------------------------------------------


def test_fast_dev_run_mnist1d(tmp_path, cache_dir):
    metrics = run_train([*FAST, "method=prokt"], tmp_path, cache_dir)
    assert metrics["status"] == "ok" and metrics["method"] == "prokt"
    assert metrics["teacher/source"] == "random init"
    assert 0.0 <= metrics["teacher/acc"] <= 1.0 and 0.0 <= metrics["student/acc"] <= 1.0


def test_checkpoint_holds_the_trained_teacher_and_both_schedulers_step(tmp_path, cache_dir):
    from kdx.pipeline.build import build

    cfg = compose_train(
        [
            "method=prokt",
            "debug=limit",
            "trainer.accelerator=cpu",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "dataset.datamodule.batch_size=32",
            "optim@method.teacher_optim=sgd",
            "method.teacher_optim.optimizer.lr=0.05",
            "optim=sgd",
        ],
        tmp_path,
        cache_dir,
    )
    parts = build(cfg)
    module, datamodule, info = parts.module, parts.datamodule, parts.teacher_info
    assert info["teacher/source"] == "random init"
    initial = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    trainer = instantiate(
        cfg.trainer, logger=False, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)]
    )
    trainer.fit(module, datamodule=datamodule)

    # validation logs the teacher's accuracy next to the student's, training logs the teacher terms
    for key in (
        "val/student/acc",
        "val/teacher/acc",
        "train/teacher/loss_epoch",
        "train/teacher/kl_epoch",
        "train/kd_epoch",
    ):
        assert key in trainer.callback_metrics, key
    # schedulers: the student's and the teacher's (conf/optim/sgd.yaml) epoch-interval cosines stepped
    # twice each, the teacher's with its horizon (T_max) filled from the run's length like the student's
    student_sched, teacher_sched = (c.scheduler for c in trainer.lr_scheduler_configs)
    assert student_sched.last_epoch == 2 and teacher_sched.last_epoch == 2
    assert teacher_sched.T_max == 2 and isinstance(teacher_sched.optimizer, torch.optim.SGD)
    assert teacher_sched.optimizer.param_groups[0]["initial_lr"] == 0.05
    assert trainer.global_step == 8  # Lightning counts both optimizers' steps

    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    saved = {k.removeprefix("teacher."): v for k, v in ckpt["state_dict"].items() if k.startswith("teacher.")}
    trained = module.teacher.state_dict()
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[k], trained[k]) for k in trained)
    assert any(not torch.equal(trained[k], initial[k]) for k in trained if trained[k].is_floating_point())
    assert len(ckpt["optimizer_states"]) == 2
    # and kdx's teacher loader takes the trained teacher out of such a run checkpoint
    fresh = instantiate(cfg.teacher.model)
    load_weights(fresh, tmp_path / "ckpt" / "last.ckpt")
    assert all(torch.equal(v, module.teacher.model.state_dict()[k]) for k, v in fresh.state_dict().items())


_CIFAR = [
    Path(CONF_DIR) / p
    for p in ("dataset/synthetic_cifar.yaml", "teacher/resnet20.yaml", "student/resnet8.yaml")
]


def test_fast_dev_run_cifar_zoo_pair(tmp_path, cache_dir):
    metrics = run_train(
        [
            *FAST,
            "method=prokt",
            "dataset=synthetic_cifar",
            "teacher=resnet20",
            "student=resnet8",
            "method.zero_init_heads=true",
            "optim@method.teacher_optim=sgd",
            "method.teacher_snapshot=train",
            "dataset.datamodule.batch_size=16",
            "dataset.datamodule.num_train=64",
            "dataset.datamodule.num_val=32",
            "dataset.datamodule.num_test=32",
        ],
        tmp_path,
        cache_dir,
    )
    assert metrics["status"] == "ok" and metrics["teacher/source"] == "random init"


def test_fast_dev_run_hier_synthetic(tmp_path, cache_dir):
    metrics = run_train([*FAST, "method=prokt", "dataset=hier_synthetic"], tmp_path, cache_dir)
    assert metrics["status"] == "ok" and metrics["dataset"] == "hier_synthetic"
    assert "teacher/acc" in metrics  # the jointly trained teacher is measured too
