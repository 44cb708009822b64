"""Published numbers scored as published: AB's pre-activation features, FT's paraphraser step,
GLUE's task metrics, validation every N steps, ProKT's batch and cadence, and which figure
kdx-table compares with each source. Golden values derived by hand in the comments."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn

from conftest import compose_train
from kdx.data.glue import TASKS
from kdx.data.synthetic import SyntheticDataModule
from kdx.methods import METHODS
from kdx.metrics import FidelityMetrics
from kdx.models.adapter import as_feature_model
from kdx.models.base import EMBEDDING, LOGITS, PREACT_STAGES
from kdx.table import make_table
from kdx.teacher_outputs import TeacherOutputCache
from test_preact_features import CASES, _pair
from test_table import ok_record, write_run

# ---------------------------------------------------------------------------------------------
# AB on pre-activation features, against RepDistiller's ABLoss on an independent preact forward


def _official_ab(g_s: list[torch.Tensor], g_t: list[torch.Tensor], margin: float = 1.0) -> torch.Tensor:
    """RepDistiller distiller_zoo/AB.py, ABLoss.forward with criterion_alternative_l2, summed
    (helper/pretrain.py: loss = sum(loss_group))."""
    n, bsz = len(g_s), g_s[0].shape[0]
    weights = [2 ** (i - n + 1) for i in range(n)]
    total = 0.0
    for w, s, t in zip(weights, g_s, g_t):
        loss = (s + margin) ** 2 * ((s > -margin) & (t <= 0)).float() + (s - margin) ** 2 * (
            (s <= margin) & (t > 0)
        ).float()
        total = total + w * torch.abs(loss).sum() / bsz / 1000 * 3
    return total


@pytest.mark.parametrize(
    ("teacher", "student"), [("wrn_40_2", "wrn_16_1"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8")]
)
def test_ab_loss_equals_the_official_loss_on_repdistillers_preact_features(teacher, student):
    t_model, t_ref = _pair(teacher)
    s_model, s_ref = _pair(student)
    s_feat, t_feat = as_feature_model(s_model), as_feature_model(t_model)
    method = METHODS["ab"]()
    method.setup(s_feat, t_feat, SyntheticDataModule(input_shape=(3, 32, 32), num_classes=100))
    method.eval()  # the connectors' BatchNorm with its running statistics: one output for both sides
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = method.init_term(s_feat(x, method.reads), t_feat(x, method.reads))
        # the reference: RepDistiller's feat[1:-1] under preact=True, through the same connectors
        _, s_pre, _ = CASES[student][0](s_ref, x)
        _, t_pre, _ = CASES[teacher][0](t_ref, x)
        g_s = [connector(f) for connector, f in zip(method.connectors, s_pre[1:])]
        official = _official_ab(g_s, t_pre[1:])
    assert official.item() > 0
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-6)
    # and it is not the post-activation loss (what AB read before)
    post = METHODS["ab"](features="stages")
    post.setup(s_feat, t_feat, SyntheticDataModule(input_shape=(3, 32, 32), num_classes=100))
    post.connectors.load_state_dict(method.connectors.state_dict())
    post.eval()
    with torch.no_grad():
        assert (
            abs(post.init_term(s_feat(x, post.reads), t_feat(x, post.reads)).item() - official.item()) > 1e-4
        )


def test_the_teacher_output_cache_stores_and_serves_preact_stages(tmp_path):
    t_model, _ = _pair("resnet8x4")
    out = as_feature_model(t_model)(torch.randn(2, 3, 32, 32), frozenset({LOGITS, EMBEDDING, PREACT_STAGES}))
    parts = TeacherOutputCache._parts(out, frozenset({LOGITS, EMBEDDING, PREACT_STAGES}))
    assert {f"preact{i}" for i in range(len(out.preact_stages))} <= set(parts)
    cache = TeacherOutputCache("exact", str(tmp_path), {})
    cache.info = {"stages": 0, "preact_stages": len(out.preact_stages), "num_classes": 100}
    cache._use({})
    served = cache.output(parts)
    assert served.stages == [] and len(served.preact_stages) == len(out.preact_stages) == 4
    for a, b in zip(served.preact_stages, out.preact_stages):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# FT: the paraphraser's pre-training step is RepDistiller's (plain MSE; its lr rule)


def test_ft_init_gradient_equals_nn_mse_loss_gradient():
    t_model, _ = _pair("resnet32x4")
    s_model, _ = _pair("resnet8x4")
    s_feat, t_feat = as_feature_model(s_model), as_feature_model(t_model)
    method = METHODS["ft"]()
    method.setup(s_feat, t_feat, SyntheticDataModule(input_shape=(3, 32, 32), num_classes=100))
    reference = copy.deepcopy(method.paraphraser)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        teacher = t_feat(x, method.reads)
    loss = method.init_term(None, teacher)
    loss.backward()
    f_t = teacher.stages[-1]  # feat[-2]: the last stage output
    official = nn.MSELoss()(reference(f_t)[1], f_t)  # helper/pretrain.py: criterion(f_t_rec, f_t)
    official.backward()
    torch.testing.assert_close(loss, official, rtol=0, atol=0)
    for ours, theirs in zip(method.paraphraser.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0)


def test_ft_init_lr_follows_repdistillers_rule():
    ft = METHODS["ft"]()
    assert ft.init_lr("resnet8x4", 0.05) == 0.01 and ft.init_lr("wrn_16_2", 0.05) == 0.01
    assert ft.init_lr("vgg8", 0.05) == 0.05 and ft.init_lr("mobile_half", 0.01) == 0.01
    assert METHODS["ft"](init_lr=0.02).init_lr("resnet8x4", 0.05) == 0.02
    assert METHODS["ab"]().init_lr("resnet8x4", 0.05) == 0.05  # AB, FSP: the student's lr


# ---------------------------------------------------------------------------------------------
# GLUE: MCC for CoLA, F1 (and accuracy) for MRPC and QQP


def _scores(names: tuple[str, ...]) -> dict[str, float]:
    # predictions [1, 1, 0, 0, 1, 0] against labels [1, 0, 0, 0, 1, 1]:
    # TP = 2 (0, 4), FP = 1 (1), TN = 2 (2, 3), FN = 1 (5)
    predicted = torch.tensor([1, 1, 0, 0, 1, 0])
    y = torch.tensor([1, 0, 0, 0, 1, 1])
    metrics = FidelityMetrics(2, with_teacher=False, scores=names)
    metrics.update(nn.functional.one_hot(predicted, 2).float() * 3, None, y)
    return {k: v.item() for k, v in metrics.compute().items()}


def test_mcc_golden():
    # (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 − 1) / sqrt(3·3·3·3) = 1/3
    out = _scores(("mcc",))
    assert out["student/mcc"] == pytest.approx(1 / 3, abs=1e-6) and out["student/acc"] == pytest.approx(4 / 6)
    assert "student/f1" not in out


def test_f1_golden():
    # 2·TP / (2·TP + FP + FN) = 4 / 6
    out = _scores(("f1",))
    assert out["student/f1"] == pytest.approx(2 / 3, abs=1e-6) and out["student/acc"] == pytest.approx(4 / 6)


def test_glue_tasks_declare_the_papers_metric():
    assert TASKS["cola"].scores == ("mcc",) and TASKS["cola"].monitor == "val/student/mcc"
    for task in ("mrpc", "qqp"):
        assert TASKS[task].scores == ("f1",) and TASKS[task].monitor == "val/student/f1"
    for task in ("sst2", "mnli", "qnli", "rte"):
        assert TASKS[task].scores == () and TASKS[task].monitor == "val/student/acc"


@pytest.mark.parametrize("task", ["cola", "mrpc", "qqp", "sst2"])
def test_a_glue_run_monitors_the_tasks_metric_by_default(task, tmp_path, cache_dir):
    cfg = compose_train(["dataset=glue", f"dataset.task={task}"], tmp_path, cache_dir)
    assert cfg.monitor == TASKS[task].monitor == cfg.callbacks.model_checkpoint.monitor
    assert compose_train([], tmp_path, cache_dir).monitor == "val/student/acc"  # data sets without one


@pytest.mark.parametrize("task", ["cola", "mrpc", "qqp", "sst2", "rte"])
def test_prokt_glue_rows_monitor_the_tasks_metric(task, tmp_path, cache_dir):
    cfg = compose_train([f"experiment=prokt_glue/{task}"], tmp_path, cache_dir)
    assert cfg.monitor == TASKS[task].monitor == cfg.callbacks.model_checkpoint.monitor
    assert cfg.published.reported == "best"


def test_prokt_glue_sst2_has_the_official_effective_batch_and_cadence(tmp_path, cache_dir):
    cfg = compose_train(["experiment=prokt_glue/sst2"], tmp_path, cache_dir)
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    # one batch of 256 (ProKT optimises manually: Lightning accumulates no gradients for it)
    assert cfg.dataset.datamodule.batch_size * accumulate * cfg.trainer.devices == 256 and accumulate == 1
    # dev every 500 training batches (= student steps), counted across epochs
    assert cfg.trainer.val_check_interval == 500 and cfg.trainer.check_val_every_n_epoch is None


def test_the_cfg_job_command_shows_batch_256_and_validation_every_500_steps(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "kdx.train", "experiment=prokt_glue/sst2", "--cfg", "job", "--resolve"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "batch_size: 256" in out.stdout and "val_check_interval: 500" in out.stdout
    assert "check_val_every_n_epoch: null" in out.stdout


# ---------------------------------------------------------------------------------------------
# Validation every N steps, with the best checkpoint chosen after each


class Validations(L.Callback):
    def __init__(self):
        self.at: list[tuple[int, int]] = []  # (epoch, batches done in it) of each validation
        self.best_saved_mid_epoch = False

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.at.append(
                (trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.completed)
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0 and batch_idx == 3:  # mid first epoch, after the validation at 2
            self.best_saved_mid_epoch = bool(trainer.checkpoint_callback.best_model_path)


def test_val_check_interval_validates_and_selects_every_n_steps(tmp_path, cache_dir):
    from kdx.pipeline.build import build
    from kdx.pipeline.fit import fit, make_callbacks, make_loggers
    from kdx.pipeline.validate import validate_config

    cfg = compose_train(
        [
            "dataset=synthetic",
            "method=none",
            "teacher=none",
            "dataset.datamodule.num_train=64",
            "dataset.datamodule.batch_size=16",
            "trainer.max_epochs=2",
            "trainer.val_check_interval=2",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            "logger=csv",
        ],
        tmp_path,
        cache_dir,
    )
    validate_config(cfg)
    parts = build(cfg)
    probe = Validations()
    fit(cfg, parts, [*make_callbacks(cfg), probe], make_loggers(cfg, "val-check"))
    # 4 batches an epoch: validation after batches 2 and 4 of each epoch
    assert probe.at == [(0, 2), (0, 4), (1, 2), (1, 4)]
    assert probe.best_saved_mid_epoch  # the best checkpoint was chosen after the mid-epoch validation


# ---------------------------------------------------------------------------------------------
# kdx-table compares each column on the figure its source reports

CRD_PUBLISHED = {
    "source": "RepDistiller README",
    "reported": "last",
    "sources": {
        "dkd": {"source": "mdistiller README", "reported": "best"},
        "dist": {"source": "DIST README", "reported": "unsettled"},
    },
    "units": "percent",
    "tolerance": 0.5,
    "teacher": 75.61,
    "student": {"ab": 73.17, "dkd": 76.32, "dist": 76.31},
}


def test_each_column_is_compared_on_its_sources_figure(tmp_path):
    exp = "crd_cifar100/wrn_40_2_wrn_16_2"
    # (method, best, last) as fractions; the published numbers are in percent
    runs = [("ab", 0.7400, 0.7300), ("dkd", 0.7632, 0.7500), ("dist", 0.7700, 0.7600)]
    for i, (method, best, last) in enumerate(runs):
        write_run(
            tmp_path / str(i), ok_record(method, 0, best, last, published=CRD_PUBLISHED, experiment=exp)
        )
    rows, markdown = make_table([tmp_path], figure=False)
    by = {r["method"]: r for r in rows}
    # RepDistiller column (AB): the last epoch, 73.00 − 73.17 = −0.17, within 0.5
    assert by["ab"]["published_metric"] == "student/acc" and by["ab"]["published_reported"] == "last"
    assert by["ab"]["delta"] == pytest.approx(-0.17) and by["ab"]["within_tolerance"] is True
    # DKD column: mdistiller's best epoch, 76.32 − 76.32 = 0 (its last, 75.00, would be −1.32)
    assert by["dkd"]["published_metric"] == "student/acc_best" and by["dkd"]["delta"] == pytest.approx(0.0)
    assert by["dkd"]["within_tolerance"] is True and by["dkd"]["published_source"] == "mdistiller README"
    # DIST: unsettled, Δ on both (76.00 − 76.31 = −0.31 last, 77.00 − 76.31 = +0.69 best), no verdict
    assert by["dist"]["delta"] == pytest.approx(-0.31) and by["dist"]["delta_best"] == pytest.approx(0.69)
    assert by["dist"]["within_tolerance"] is None
    assert "(last)" in markdown and "(best)" in markdown and "unsettled" in markdown
