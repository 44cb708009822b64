"""kdx.diagnostics: Tang et al.'s instance- and domain-level diagnostics callback.

Expected numbers are derived by hand in the comments and computed with plain math / numpy.
"""

from __future__ import annotations

import csv
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf, open_dict

from conftest import FAST, compose_train
from kdx.data.synthetic import HierSyntheticDataModule
from kdx.diagnostics import (
    JSON_NAME,
    PNG_NAME,
    TangDiagnostics,
    resolve_enabled,
    similarity_correlation,
    true_class_gradient_ratio,
)
from kdx.methods import METHODS
from kdx.models.small import MLP
from kdx.module import DistillationModule

ROOT = Path(__file__).resolve().parents[2]
LN2, LN3, LN6 = math.log(2), math.log(3), math.log(6)


def test_gradient_ratio_golden_and_autograd():
    # K = 3, T = 2.
    # example 1, y = 0: z_s = [2 ln 2, 0, 0] -> p^T_s = [1/2, 1/4, 1/4], p_s = [4, 1, 1]/6
    #                   z_t = [2 ln 6, 2 ln 3, 0] -> p^T_t = [.6, .3, .1]
    #   ∂KD/∂z_y = T(p^T_s,y - p^T_t,y) = 2(0.5 - 0.6) = -0.2;  ∂CE/∂z_y = 2/3 - 1 = -1/3;  r = 0.6
    # example 2, y = 2: z_s = 0 -> p^T_s = p_s = 1/3;  z_t = [2 ln 2, 0, 0] -> p^T_t,y = 1/4
    #   ∂KD/∂z_y = 2(1/3 - 1/4) = 1/6;  ∂CE/∂z_y = 1/3 - 1 = -2/3;  r = -1/4
    t = 2.0
    zs = torch.tensor([[2 * LN2, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    zt = torch.tensor([[2 * LN6, 2 * LN3, 0.0], [2 * LN2, 0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    ratio = true_class_gradient_ratio(zs, F.softmax(zt / t, -1), y, t)
    assert ratio.tolist() == pytest.approx([0.6, -0.25], abs=1e-9)

    # the same from autograd: per-example T²·KL(p^T_t ‖ p^T_s) and CE, gradient on z_y
    z = zs.clone().requires_grad_(True)
    pt = F.softmax(zt / t, -1)
    kd = (t**2 * (pt * (pt.log() - F.log_softmax(z / t, -1))).sum(1)).sum()
    (g_kd,) = torch.autograd.grad(kd, z)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), z)
    rows = torch.arange(2)
    assert torch.allclose(ratio, g_kd[rows, y] / g_ce[rows, y], atol=1e-12)
    # a student sure to 1 - 1e-20 still gives a finite ratio (1 - p_s,y from expm1)
    sure = torch.tensor([[50.0, 0.0, 0.0]], dtype=torch.float64)
    assert torch.isfinite(true_class_gradient_ratio(sure, F.softmax(zt[:1] / t, -1), y[:1], t)).all()


def test_similarity_correlation_hand_values():
    # teacher rows [2,0], [0,3], [1,1]: unit rows [1,0], [0,1], [1,1]/√2
    #   off-diagonal (0,1), (0,2), (1,2) = [0, 1/√2, 1/√2]
    teacher = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    # the same directions at other lengths: r = 1; mirrored third row: [0, -1/√2, -1/√2], r = -1
    assert similarity_correlation(teacher * torch.tensor([[5.0], [0.1], [2.0]]), teacher) == pytest.approx(
        1.0
    )
    assert similarity_correlation(torch.tensor([[1.0, 0], [0, 1], [-1, -1]]), teacher) == pytest.approx(-1.0)
    # student rows [1,0], [1,1], [0,1]: off-diagonal = [1/√2, 0, 1/√2]; Pearson with numpy's own formula
    r = 1 / math.sqrt(2)
    expected = np.corrcoef([r, 0.0, r], [0.0, r, r])[0, 1]  # = -1/2
    assert expected == pytest.approx(-0.5)
    assert similarity_correlation(torch.tensor([[1.0, 0], [1, 1], [0, 1]]), teacher) == pytest.approx(
        expected
    )


def test_enabled_resolution():
    ls, kd, none = METHODS["ls"](), METHODS["kd"](), METHODS["none"]()
    assert (
        resolve_enabled("auto", ls) and not resolve_enabled("auto", kd) and not resolve_enabled("auto", none)
    )
    for name in ("kd_pt", "kd_sim", "kd_pt_sim"):
        assert METHODS[name]().soft_target().diagnostics_by_default
    assert METHODS["kd"]().soft_target() is not None and METHODS["none"]().soft_target() is None
    assert resolve_enabled(True, kd) and not resolve_enabled(False, ls)
    assert resolve_enabled("true", kd) and not resolve_enabled("False", ls)
    with pytest.raises(ValueError, match="auto, true or false"):
        TangDiagnostics(enabled="sometimes")


@dataclass
class TrainerState:
    """The two things the callback's ``setup`` and instance-level figures read from the trainer."""

    datamodule: Any
    default_root_dir: str


def _measure(method_name: str, tmp_path: Path, **method_kwargs):
    """The callback's instance-level figures for a 4-class student whose logits are all 0."""
    dm = HierSyntheticDataModule(
        num_super=2, sub_per_super=2, dim=8, num_train=64, num_val=32, num_test=32, batch_size=32
    )
    dm.setup("fit")
    student = MLP(4, (8,), hidden=(16,))
    with torch.no_grad():
        student.classifier.weight.zero_()
        student.classifier.bias.zero_()
    module = DistillationModule(
        student=student,
        method=METHODS[method_name](**method_kwargs),
        num_classes=4,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        teacher=MLP(4, (8,), hidden=(32,)),
    )
    trainer = TrainerState(datamodule=dm, default_root_dir=str(tmp_path))
    diag = TangDiagnostics(enabled="auto", max_samples=64)
    diag.setup(trainer, module, "fit")
    return diag, diag._instance_level(trainer, module)


def test_gradient_ratio_uses_the_methods_own_target(tmp_path):
    # ls (ε = 0.1, T = 4, K = 4) with z_s = 0: p^T_s,y = p_s,y = 1/4 and q_y = 1 − ε = 0.9, so
    #   r = T·(q_y − p^T_s,y)/(1 − p_s,y) = 4·(0.9 − 0.25)/0.75 = 3.4666…   for every example,
    # whatever the teacher says (its p_t,y is still reported, on its own).
    diag, figures = _measure("ls", tmp_path)
    assert diag.active and diag._temperature == 4.0
    np.testing.assert_allclose(figures["q_true"], 0.9, rtol=1e-6)
    np.testing.assert_allclose(figures["grad_ratio"], 4 * 0.65 / 0.75, rtol=1e-6)
    assert figures["p_t_true"].shape == (64,) and not np.allclose(figures["p_t_true"], 0.9)
    # kd_pt at T' = 1: q_y is the teacher's plain confidence p_t,y, r = 4·(p_t,y − 1/4)/(3/4)
    diag, figures = _measure("kd_pt", tmp_path, target_temperature=1.0)
    np.testing.assert_allclose(figures["q_true"], figures["p_t_true"], rtol=1e-5)
    # float32 softmax against float64 arithmetic: an absolute tolerance for ratios near 0
    np.testing.assert_allclose(
        figures["grad_ratio"], 4 * (figures["p_t_true"] - 0.25) / 0.75, rtol=1e-5, atol=1e-6
    )


def test_a_method_without_temperature_fails_loudly(tmp_path):
    # the diagnostics read T from the method's declared soft target; a rename must not switch the
    # diagnostics off (or fall back to a default T) without a word
    method = METHODS["kd_pt"]()
    del method.temperature
    module = DistillationModule(
        student=MLP(4, (8,), hidden=(16,)),
        method=method,
        num_classes=4,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        teacher=MLP(4, (8,), hidden=(32,)),
    )
    trainer = TrainerState(datamodule=None, default_root_dir=str(tmp_path))
    with pytest.raises(AttributeError, match="temperature"):
        TangDiagnostics(enabled="auto").setup(trainer, module, "fit")
    with pytest.raises(AttributeError, match="temperature"):
        TangDiagnostics(enabled=True).setup(trainer, module, "fit")


# ---------------------------------------------------------------------------------------------
# The callback in a real (tiny) Lightning fit.


def _fit(tmp_path: Path, method: str, enabled="auto", with_teacher: bool = True, epochs: int = 2):
    dm = HierSyntheticDataModule(
        num_super=2, sub_per_super=2, dim=8, num_train=96, num_val=32, num_test=32, batch_size=32
    )
    torch.manual_seed(0)
    module = DistillationModule(
        student=MLP(4, (8,), hidden=(16,)),
        method=METHODS[method](),
        num_classes=4,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
        teacher=MLP(4, (8,), hidden=(32,)) if with_teacher else None,
    )
    diag = TangDiagnostics(enabled=enabled, dirpath=str(tmp_path / "diag"), max_samples=64, bins=5)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=CSVLogger(tmp_path, name="csv", version=""),
        callbacks=[diag],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=dm)
    return trainer, diag


def test_callback_writes_json_png_and_logs_correlation(tmp_path):
    trainer, diag = _fit(tmp_path, "kd_pt_sim")
    assert "diag/sim_corr" in trainer.callback_metrics
    assert -1.0 <= float(trainer.callback_metrics["diag/sim_corr"]) <= 1.0
    for key in ("diag/p_t_true_q50", "diag/grad_ratio_q50", "diag/sim_corr_true_teacher"):
        assert key in trainer.callback_metrics, key
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["diag/sim_corr"] for r in rows if r.get("diag/sim_corr")], "sim_corr not in the CSV log"

    data = json.loads((tmp_path / "diag" / JSON_NAME).read_text())
    assert [e["epoch"] for e in data["epochs"]] == [0, 1]
    assert data["temperature"] == 4.0 and data["quantile_levels"] == [0.05, 0.25, 0.5, 0.75, 0.95]
    last = data["epochs"][-1]
    p = last["p_t_true"]
    assert p["n"] == 64 and sum(p["hist"]["counts"]) == 64 and len(p["hist"]["edges"]) == 6
    assert 0.0 <= p["quantiles"][0] <= p["quantiles"][2] <= p["quantiles"][4] <= 1.0
    assert last["grad_ratio"]["n"] == 64 and -1.0 <= last["sim_corr"] <= 1.0
    summary = diag.report()
    assert (
        summary["diag/sim_corr"] == last["sim_corr"]
        and summary["diag/grad_ratio_q50"] == last["grad_ratio"]["quantiles"][2]
    )
    png = tmp_path / "diag" / PNG_NAME
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_callback_without_teacher_skips_teacher_parts(tmp_path):
    trainer, diag = _fit(tmp_path, "none", enabled=True, with_teacher=False, epochs=1)
    assert diag.active
    assert "diag/sim_corr" not in trainer.callback_metrics
    assert "diag/sim_corr_true_student" in trainer.callback_metrics  # hier data knows the truth
    data = json.loads((tmp_path / "diag" / JSON_NAME).read_text())
    assert "p_t_true" not in data["epochs"][0] and "grad_ratio" not in data["epochs"][0]
    assert (tmp_path / "diag" / PNG_NAME).exists()  # the student's (and the data's) similarity


def test_callback_auto_is_off_for_kd(tmp_path):
    trainer, diag = _fit(tmp_path, "kd", epochs=1)
    assert not diag.active and not (tmp_path / "diag").exists()
    assert not any(k.startswith("diag/") for k in trainer.callback_metrics)


@pytest.mark.slow
def test_hydra_run_with_diagnostics_config(tmp_path, cache_dir):
    """The callback config composes and runs through kdx-train (fast_dev_run)."""
    from kdx.train import run

    cfg = compose_train([*FAST, "method=kd_sim"], tmp_path, cache_dir)
    if "diagnostics" not in (cfg.get("callbacks") or {}):  # until callbacks/default.yaml lists it
        node = OmegaConf.load(ROOT / "conf/callbacks/diagnostics.yaml")
        with open_dict(cfg):
            cfg.callbacks = cfg.get("callbacks") or {}
            cfg.callbacks.diagnostics = node.diagnostics
    assert cfg.callbacks.diagnostics.enabled == "auto"
    metrics = run(cfg)
    assert metrics["status"] == "ok"
    data = json.loads((tmp_path / "diagnostics" / JSON_NAME).read_text())
    assert data["epochs"] and "sim_corr" in data["epochs"][0] and "grad_ratio" in data["epochs"][0]
    assert (tmp_path / "diagnostics" / PNG_NAME).exists()
