"""Tang et al.'s diagnostics, as a Lightning callback that works with any method.

Tang, Shivanna, Zhao, Lin, Singh, Chi, Jain, *Understanding and Improving Knowledge Distillation*
(arXiv 2002.03532) read what a teacher passes on at two levels this callback measures:

**Instance level** (per epoch, on a fixed sample of training examples, student in ``eval()``):

* the teacher's probability on the true class, ``p_t,y = softmax(z_t)_y`` (T = 1), when there is a
  teacher, and the true-class mass ``q_y`` of the target the method distils towards;
* the ratio ``r`` of the distillation and CE gradients on the true-class logit ``z_y``, for the
  method's own target ``q`` (``DistillationMethod.soft_target()``: Hinton KD's ``softmax(z_t/T)``,
  ``ls``'s smoothed label, ``kd_pt``'s partial teacher, ...). With ``p^T = softmax(z/T)`` and
  ``log p^T_k = z_k/T − log Σ_j exp(z_j/T)``, so that ``∂ log p^T_k/∂z_y = (1[k=y] − p^T_y)/T``::

      L_KD = T²·KL(q ‖ p_s^T) = T²·Σ_k q_k (log q_k − log p^T_s,k)
      ∂L_KD/∂z_y = −T²·Σ_k q_k·(1[k=y] − p^T_s,y)/T = T·(p^T_s,y − q_y)     (Σ_k q_k = 1)
      ∂CE/∂z_y   = p_s,y − 1
      r = T·(p^T_s,y − q_y) / (p_s,y − 1) = T·(q_y − p^T_s,y) / (1 − p_s,y)

  ``r > 0``: both terms raise ``z_y``; ``r < 0``: the target is less sure than the student and the
  distillation term lowers ``z_y``. ``r`` is the unweighted ratio; in the loss ``(1-α)·CE + α·KD`` the terms
  weigh ``α·r : (1-α)``. Its spread over examples is the teacher's per-instance gradient rescaling.

  When the student is sure of y, ``1 − p_s,y → 0`` and ``|r|`` grows without bound (CE has stopped
  pushing, KD has not), so read ``r`` by its quantiles; its mean is kept in the JSON only.

  Logged per epoch: quantiles (``diag/p_t_true_q50``, ``diag/q_true_q50``,
  ``diag/grad_ratio_q50``, ...), histograms on TensorBoard and W&B loggers, and everything
  (quantiles, means, histogram counts on a 1–99 % range) in ``<dirpath>/diagnostics.json``.
  For Hinton KD ``q_y`` is the teacher's true-class probability at the method's T.

**Domain level**: the Pearson correlation ``diag/sim_corr`` between the off-diagonal entries of the
student's and the teacher's class-similarity matrices (cosine of classifier weight vectors), per
epoch; at the end of training a heat map of both matrices goes to ``<dirpath>/class_similarity.png``.
When the data module offers ``true_class_similarity()`` (``dataset=hier_synthetic``), the
correlations of both models with the true similarity are logged too (``diag/sim_corr_true_*``,
classifier rows centred like the data's class means) and the true matrix joins the heat map.

Without a teacher only the student's similarity matrix is drawn and ``p_t_true`` is left out.

What the callback needs from a method is declared by the method, not guessed: ``soft_target()``
returns a :class:`~kdx.methods.base.SoftTarget` (temperature, target builder, whether the
diagnostics are on by default). ``enabled: auto`` switches the callback on when that declaration
says ``diagnostics_by_default`` (``ls``, ``kd_pt``, ``kd_sim``, ``kd_pt_sim``). With ``enabled:
true`` a method that declares no target (``none``, ``kda``, ``rdim``) is measured against Hinton
KD's target at the callback's ``temperature`` (4 when null), and ``diagnostics.json`` says so
(``"target": "hinton (the method declares none)"``). Files are written and metrics computed on
global rank zero only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor

from kdx.callbacks import ReportsMetrics
from kdx.errors import KDXError
from kdx.methods.base import SoftTarget, hinton_target, train_mode
from kdx.methods.tang_targets import class_similarity
from kdx.utils import atomic_write_json

log = logging.getLogger("kdx")

JSON_NAME = "diagnostics.json"
PNG_NAME = "class_similarity.png"


# ---------------------------------------------------------------------------------------------
# The quantities, as plain functions (tested on their own).


def true_class_gradient_ratio(
    student_logits: Tensor, target: Tensor, y: Tensor, temperature: float
) -> Tensor:
    """``r = T·(p^T_s,y − q_y) / (p_s,y − 1)`` per example (float64, see the module docstring);
    ``target`` is the method's target distribution ``q`` (B, K)."""
    zs = student_logits.double()
    idx = y[:, None]
    ps_t = F.softmax(zs / temperature, -1).gather(1, idx).squeeze(1)
    q_y = target.double().gather(1, idx).squeeze(1)
    # 1 − p_s,y computed as −expm1(log p_s,y): exact even when the student is very sure
    one_minus_ps = -torch.expm1(F.log_softmax(zs, -1).gather(1, idx).squeeze(1))
    return temperature * (q_y - ps_t) / one_minus_ps.clamp_min(1e-300)


def off_diagonal(matrix: Tensor) -> Tensor:
    """Entries above the diagonal (the matrices are symmetric), flattened."""
    k = matrix.shape[0]
    rows, cols = torch.triu_indices(k, k, offset=1)
    return matrix[rows, cols]


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two equal-length vectors; NaN if either is constant."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    denom = a.norm() * b.norm()
    return float(a @ b / denom) if denom > 0 else float("nan")


def similarity_correlation(student_weight: Tensor, teacher_weight: Tensor, center: bool = False) -> float:
    """Pearson correlation of the off-diagonal class cosine similarities of two classifiers."""
    return pearson(
        off_diagonal(class_similarity(student_weight, center)),
        off_diagonal(class_similarity(teacher_weight, center)),
    )


def summarize(
    values: np.ndarray, levels: Sequence[float], bins: int, value_range: tuple[float, float] | None = None
) -> dict[str, Any]:
    """Mean, quantiles and a histogram of the finite values."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"n": 0}
    if value_range is None:  # robust range: outliers of a ratio would squash every bin into one
        lo, hi = np.quantile(values, [0.01, 0.99])
        value_range = (float(lo), float(hi)) if hi > lo else (float(lo) - 0.5, float(lo) + 0.5)
    counts, edges = np.histogram(np.clip(values, *value_range), bins=bins, range=value_range)
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "quantiles": [float(q) for q in np.quantile(values, list(levels))],
        "hist": {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]},
    }


def _qname(level: float) -> str:
    return f"q{round(level * 100):02d}"


def resolve_enabled(enabled: bool | str, method: Any) -> bool:
    """``true`` / ``false``, or ``auto``: what the method's ``soft_target()`` declares
    (off for a method that declares no target, and when there is no method)."""
    if isinstance(enabled, str):
        key = enabled.strip().lower()
        if key == "auto":
            if method is None:
                return False
            spec = method.soft_target()
            return spec is not None and spec.diagnostics_by_default
        if key in ("true", "false"):
            return key == "true"
        raise ValueError(f"callbacks.diagnostics.enabled={enabled!r}: use auto, true or false")
    return bool(enabled)


# ---------------------------------------------------------------------------------------------
# The callback.


class TangDiagnostics(L.Callback, ReportsMetrics):
    """Instance- and domain-level diagnostics of Tang et al. (see the module docstring).

    Args:
        enabled: ``auto`` (on when the method's ``soft_target()`` says ``diagnostics_by_default``),
            ``true`` or ``false``.
        dirpath: folder for ``diagnostics.json`` and ``class_similarity.png``
            (default ``<trainer.default_root_dir>/diagnostics``).
        max_samples: training examples (in loader order, unshuffled) measured each epoch.
        temperature: T of the gradient ratio for a method that declares no soft target (``null``: 4);
            a method that declares one is measured at its own T (a different value here is an error).
        bins: histogram bins.
        every_n_epochs: measure every n-th training epoch.
        center: centre the classifier weights (subtract the mean row) before the cosine.
        quantiles: the quantile levels reported.
    """

    def __init__(
        self,
        enabled: bool | str = "auto",
        dirpath: str | None = None,
        max_samples: int = 2048,
        temperature: float | None = None,
        bins: int = 20,
        every_n_epochs: int = 1,
        center: bool = False,
        quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
    ):
        super().__init__()
        resolve_enabled(enabled, None)  # fail early on a bad value
        if max_samples < 1 or bins < 1 or every_n_epochs < 1:
            raise ValueError("callbacks.diagnostics: max_samples, bins and every_n_epochs must be >= 1")
        if temperature is not None and temperature <= 0:
            raise ValueError(f"callbacks.diagnostics.temperature={temperature} must be > 0 (or null)")
        self.enabled = enabled
        self.dirpath = dirpath
        self.max_samples = int(max_samples)
        self.temperature = temperature
        self.bins = int(bins)
        self.every_n_epochs = int(every_n_epochs)
        self.center = bool(center)
        self.quantiles = [float(q) for q in quantiles]
        self.active = False
        self.history: list[dict[str, Any]] = []
        self._loader = None
        self._dir: Path | None = None
        self._temperature = 4.0
        self._target: SoftTarget | None = None
        self._target_name = ""
        self._target_needs_teacher = True
        self._warned: set[str] = set()

    # -- lifecycle ----------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        method = pl_module.method
        self.active = resolve_enabled(self.enabled, method)
        if not self.active:
            return
        self._dir = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "diagnostics"
        declared = method.soft_target()
        if declared is None:
            self._temperature = float(self.temperature or 4.0)
            self._target = SoftTarget(self._temperature, hinton_target(self._temperature))
            self._target_name = "hinton (the method declares none)"
            self._target_needs_teacher = True
        else:
            if self.temperature is not None and float(self.temperature) != float(declared.temperature):
                raise KDXError(
                    f"callbacks.diagnostics.temperature={self.temperature} but method={method.name} "
                    f"distils at T={declared.temperature}; leave the callback's temperature at null"
                )
            self._target, self._temperature = declared, float(declared.temperature)
            self._target_name = f"{method.name} (declared by the method)"
            self._target_needs_teacher = method.teacher_use.needs_teacher

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active or trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        if not trainer.is_global_zero:
            return
        record: dict[str, Any] = {"epoch": int(trainer.current_epoch), "step": int(trainer.global_step)}
        scalars: dict[str, float] = {}
        instance = self._instance_level(trainer, pl_module)
        for key, values in instance.items():
            probability = key.startswith("p_t") or key.startswith("q_")
            record[key] = summary = summarize(
                values, self.quantiles, self.bins, (0.0, 1.0) if probability else None
            )
            if summary["n"]:
                if key != "grad_ratio":  # the ratio's mean is ruled by students sure of y (1 − p_s,y → 0)
                    scalars[f"diag/{key}_mean"] = summary["mean"]
                scalars.update(
                    {f"diag/{key}_{_qname(q)}": v for q, v in zip(self.quantiles, summary["quantiles"])}
                )
        domain = self._domain_level(trainer, pl_module)
        record.update({k: None if math.isnan(v) else v for k, v in domain.items()})
        scalars.update({f"diag/{k}": v for k, v in domain.items() if not math.isnan(v)})
        if scalars:
            pl_module.log_dict(scalars, on_step=False, on_epoch=True, rank_zero_only=True)
        self._log_histograms(trainer, instance)
        self.history = [h for h in self.history if h["epoch"] != record["epoch"]] + [record]
        self._write_json()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active or not trainer.is_global_zero:
            return
        self._write_json()
        try:
            self._plot(trainer, pl_module)
        except Exception as err:  # a failed figure must not fail a finished run
            log.warning("diagnostics: could not draw %s: %s", PNG_NAME, err)

    def report(self) -> dict[str, float]:
        """The last measured epoch's headline figures, for ``metrics.json`` (empty when inactive)."""
        if not self.active or not self.history:
            return {}
        last, out = self.history[-1], {}
        for key in ("p_t_true", "q_true", "grad_ratio"):
            if last.get(key, {}).get("n"):
                if key != "grad_ratio":
                    out[f"diag/{key}_mean"] = last[key]["mean"]
                if 0.5 in self.quantiles:
                    out[f"diag/{key}_q50"] = last[key]["quantiles"][self.quantiles.index(0.5)]
        out.update({f"diag/{k}": v for k, v in last.items() if k.startswith("sim_corr") and v is not None})
        return out

    # -- instance level -----------------------------------------------------------------------
    def _train_loader(self, trainer: L.Trainer):
        if self._loader is None:
            datamodule = trainer.datamodule
            self._loader = None if datamodule is None else datamodule.train_eval_dataloader()
        return self._loader

    @torch.no_grad()
    def _instance_level(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, np.ndarray]:
        teacher, student = pl_module.teacher, pl_module.student
        loader = self._train_loader(trainer)
        if loader is None or self._target is None:
            return {}
        if teacher is None and self._target_needs_teacher:
            return {}
        zs, zt, qs, ys, seen = [], [], [], [], 0
        # eval(): no BN statistics or dropout change from measuring (ProKT trains its teacher)
        with train_mode(student, False), train_mode(teacher, False):
            for batch in loader:
                # x may be a mapping (text models)
                x, y = move_data_to_device((batch[0], batch[1]), pl_module.device)
                z_s = _logits(student(x))
                z_t = None if teacher is None else _logits(teacher(x))
                qs.append(self._target.target(y, z_t, z_s.shape[1]).float().cpu())
                zs.append(z_s.float().cpu())
                if z_t is not None:
                    zt.append(z_t.float().cpu())
                ys.append(y.cpu())
                seen += len(y)
                if seen >= self.max_samples:
                    break
        if not ys:
            return {}
        n = self.max_samples
        zs_, q_, y_ = torch.cat(zs)[:n], torch.cat(qs)[:n], torch.cat(ys)[:n]
        out = {
            "q_true": q_.double().gather(1, y_[:, None]).squeeze(1).numpy(),
            "grad_ratio": true_class_gradient_ratio(zs_, q_, y_, self._temperature).numpy(),
        }
        if zt:
            zt_ = torch.cat(zt)[:n]
            out["p_t_true"] = F.softmax(zt_.double(), -1).gather(1, y_[:, None]).squeeze(1).numpy()
        return out

    def _log_histograms(self, trainer: L.Trainer, instance: dict[str, np.ndarray]) -> None:
        if not instance:
            return
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        step = int(trainer.global_step)
        for logger in trainer.loggers:
            try:
                if isinstance(logger, TensorBoardLogger):
                    for key, values in instance.items():
                        logger.experiment.add_histogram(f"diag/{key}", values[np.isfinite(values)], step)
                elif isinstance(logger, WandbLogger):
                    import wandb

                    logger.log_metrics(
                        {f"diag/{k}_hist": wandb.Histogram(v[np.isfinite(v)]) for k, v in instance.items()},
                        step=step,
                    )
            except Exception as err:  # a logger that cannot take a histogram is not an error
                log.warning("diagnostics: %s did not take the histograms: %s", type(logger).__name__, err)

    # -- domain level -------------------------------------------------------------------------
    def _weights(self, pl_module: L.LightningModule) -> tuple[Tensor | None, Tensor | None]:
        def weight(model, who: str):
            if model is None:
                return None
            try:
                return model.classifier.weight.detach().float().cpu()
            except (AttributeError, TypeError, NotImplementedError) as err:
                if who not in self._warned:  # a model without a linear head: say so once, go on
                    self._warned.add(who)
                    log.warning("diagnostics: no class similarity for the %s (%s)", who, err)
                return None

        return weight(pl_module.student, "student"), weight(pl_module.teacher, "teacher")

    def _true_similarity(self, trainer: L.Trainer) -> Tensor | None:
        datamodule = trainer.datamodule
        similarity = None if datamodule is None else datamodule.true_class_similarity()
        return None if similarity is None else similarity.detach().float().cpu()

    def _domain_level(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        ws, wt = self._weights(pl_module)
        out: dict[str, float] = {}
        if ws is not None and wt is not None and ws.shape[0] == wt.shape[0]:
            out["sim_corr"] = similarity_correlation(ws, wt, self.center)
        true = self._true_similarity(trainer)
        if true is not None:
            for name, w in (("student", ws), ("teacher", wt)):
                if w is not None and w.shape[0] == true.shape[0]:
                    # the data's similarity is of centred class means, so centre the weights too
                    out[f"sim_corr_true_{name}"] = pearson(
                        off_diagonal(class_similarity(w, center=True)), off_diagonal(true)
                    )
        return out

    def _plot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        ws, wt = self._weights(pl_module)
        panels = []
        if wt is not None:
            panels.append(("teacher", class_similarity(wt, self.center)))
        if ws is not None:
            panels.append(("student", class_similarity(ws, self.center)))
        true = self._true_similarity(trainer)
        if true is not None:
            panels.append(("true (centred class means)", true))
        if not panels:
            return
        mats = []
        for _, s in panels:
            m = s.numpy().astype(float).copy()
            np.fill_diagonal(m, np.nan)  # the diagonal (1) would swamp the colour scale
            mats.append(m)
        vmax = max(float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 1.0 for m in mats) or 1.0
        # Agg canvas on a bare Figure: no pyplot state, no GUI backend, safe in any process
        fig = Figure(figsize=(4.0 * len(panels) + 1.0, 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        image = None
        for i, (ax, (name, _), m) in enumerate(zip(axes, panels, mats)):
            image = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
            ax.set_title(f"{name}")
            ax.set_xlabel("class")
            if i == 0:
                ax.set_ylabel("class")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="cosine similarity (diagonal blank)")
        domain = self._domain_level(trainer, pl_module)
        title = f"class similarity after {trainer.current_epoch} epoch(s)"
        if "sim_corr" in domain:
            title += f" · Pearson(student, teacher) = {domain['sim_corr']:.3f}"
        fig.suptitle(title)
        self._dir.mkdir(parents=True, exist_ok=True)
        tmp = self._dir / f".{PNG_NAME}.tmp.png"
        fig.savefig(tmp, dpi=100)
        tmp.replace(self._dir / PNG_NAME)

    # -- files --------------------------------------------------------------------------------
    def _write_json(self) -> None:
        if self._dir is None:
            return
        atomic_write_json(
            self._dir / JSON_NAME,
            {
                "temperature": self._temperature,
                "target": self._target_name,
                "max_samples": self.max_samples,
                "center": self.center,
                "quantile_levels": self.quantiles,
                "epochs": self.history,
            },
        )


def _logits(out: Any) -> Tensor:
    return out.logits if hasattr(out, "logits") else out
