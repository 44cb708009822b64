"""What a person sees after a sweep, and a resumed run's TensorBoard log: no process, fake folders.

The multirun report names each job by what sets it apart from the others, an Optuna sweep ends with
its best trial, and a resumed run's TensorBoard log holds every step once (``purge_step``).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from conftest import compose_train
from kdx.hydra_callbacks import MultirunReport, job_names
from kdx.pipeline.fit import Resumed, make_loggers
from kdx.record import RunRecord, write_record


def _job(sweep: Path, num: int, overrides: list[str], acc: float | None = None) -> Path:
    folder = sweep / str(num)
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), folder / ".hydra" / "overrides.yaml")
    if acc is not None:
        record = {"status": "ok", "method": "kd", "student/acc": acc, "student/acc_best": acc}
        write_record(folder, RunRecord.from_dict(record))
    return folder


def test_jobs_are_named_by_what_differs(tmp_path):
    a = _job(tmp_path, 0, ["method=kd", "method.temperature=2", "seed=0"])
    b = _job(tmp_path, 1, ["method=kd", "method.temperature=2", "seed=1"])
    c = _job(tmp_path, 2, ["method=kd", "method.temperature=4", "seed=0", "+trainer.max_epochs=3"])
    assert job_names([a, b, c]) == {
        a: "temperature=2 seed=0",
        b: "temperature=2 seed=1",
        c: "temperature=4 seed=0 max_epochs=3",  # '+' dropped; a key only one job sets is named there
    }
    assert job_names([a]) == {a: "—"}  # nothing differs in a sweep of one


def test_an_optuna_sweep_ends_with_its_best_trial(tmp_path, capsys):
    _job(tmp_path, 0, ["method.temperature=2"], acc=0.5)
    _job(tmp_path, 1, ["method.temperature=4"], acc=0.75)
    results = {"name": "optuna", "best_params": {"method.temperature": 4}, "best_value": 0.75}
    OmegaConf.save(OmegaConf.create(results), tmp_path / "optimization_results.yaml")
    MultirunReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"kdx multirun: 2 jobs in {tmp_path}"
    assert "temperature=2" in lines[1] and "50.00 %" in lines[1]
    assert "temperature=4" in lines[2] and "75.00 %" in lines[2]
    assert lines[-1] == "optuna best trial: 0.75 with method.temperature=4"


def test_a_resumed_tensorboard_log_holds_every_step_once(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose_train(["logger=tensorboard"], tmp_path, tmp_path / "cache")

    def log(steps: range, resumed: Resumed | None) -> None:
        (logger,) = make_loggers(cfg, "run", resumed=resumed)
        for step in steps:
            logger.log_metrics({"loss": float(step)}, step=step)
        logger.finalize("success")

    log(range(6), None)  # interrupted after step 5; its checkpoint was saved at step 3
    log(range(3, 8), Resumed("last.ckpt", epoch=1, global_step=3))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(8))
