"""No silent success, no poisoned cache: every case of the fault-injection pass, one test each.

Most cases fail in :func:`kdx.pipeline.validate.validate_config`, before any data or teacher work: they run
in-process against an empty cache (which must stay empty). The CLI path (exit code, one stderr
line, metrics.json) is run as a subprocess once. The multirun case (a failing job, exit 1 after the
others finished) is tests/integration/test_runs.py::test_a_bug_in_one_job_keeps_its_traceback_and_the_sweep_goes_on.
docs/failures.md has the table of cases.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from scipy.stats import binom
from torch import nn

from conftest import FAST, compose_train, run_train
from kdx.callbacks import ChanceTest, DivergenceMonitor
from kdx.errors import DivergenceError, KDXError, NoLearningError, NonFiniteLossError
from kdx.models.small import CNN1D
from kdx.models.weights import AtomicCheckpointIO, load_weights
from kdx.pipeline.build import _setup_warnings
from kdx.pipeline.record import failure_record
from kdx.pipeline.run import run_job
from kdx.pipeline.validate import validate_config
from kdx.teacher import cached_teacher_path
from kdx.utils import atomic_write_json
from test_runs import kdx

# a short real run without a teacher: the cheapest run that trains
NO_TEACHER = ["debug=limit", "trainer.accelerator=cpu", "teacher=none", "method=none", "print_summary=false"]


def strict_json(path: Path) -> dict:
    """metrics.json parsed strictly: NaN / Infinity are not JSON."""

    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def fails_before_work(overrides: list[str], tmp_path: Path, match: str) -> KDXError:
    """The run stops with one line matching ``match`` and has generated no data and trained no teacher."""
    cache = tmp_path / "empty-cache"
    with pytest.raises(KDXError, match=match) as err:
        run_train([*FAST, *overrides], tmp_path / "run", cache)
    assert "\n" not in str(err.value)
    assert not cache.exists() or not any(cache.rglob("*")), "work was done before the config was checked"
    return err.value


# -- values checked before any work ------------------------------------------------------------


def test_zero_epochs_is_an_error_not_an_untrained_ok(tmp_path):
    # fast_dev_run ignores max_epochs, so the case is run without it
    cache = tmp_path / "empty-cache"
    with pytest.raises(KDXError, match=r"trainer.max_epochs=0 trains nothing; pass an integer >= 1"):
        run_train(["trainer.max_epochs=0", "trainer.accelerator=cpu"], tmp_path / "run", cache)
    assert not cache.exists()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("seed=abc", r"seed='abc' is not an integer; pass seed=<int>"),
        ("optim.optimizer.lr=-1", r"optim.optimizer.lr=-1 is not a learning rate; pass a finite number > 0"),
        ("optim.optimizer.lr=inf", r"optim.optimizer.lr=inf is not a learning rate"),
        ("teacher.train.optim.optimizer.lr=0", r"teacher.train.optim.optimizer.lr=0 is not a learning rate"),
        ("dataset.datamodule.batch_size=0", r"dataset.datamodule.batch_size=0 is not a batch size"),
        ("teacher.train.epochs=0", r"teacher.train.epochs=0 cannot train the auto-teacher"),
        ("teacher.train.seed=x", r"teacher.train.seed='x' is not an integer"),
        ("+trainer.limit_train_batches=0", r"trainer.limit_train_batches=0 trains nothing"),
        ("channels_last=yes", r"channels_last='yes': choose auto, true or false"),
        ("compile=fast", r"compile='fast' is neither true/false nor a torch.compile backend"),
        ("cpu_allocator=jemalloc", r"cpu_allocator='jemalloc': choose retain or system"),
        (
            "student.model.name=resnet8x5",
            r"student.model.name=resnet8x5 is not a kdx zoo .*did you mean resnet8x4",
        ),
    ],
)
def test_bad_values_fail_before_any_data_or_teacher_work(tmp_path, override, match):
    extra = ["student=resnet8"] if "resnet" in override else []
    extra += ["trainer.fast_dev_run=false"] if "limit_train_batches" in override else []  # fdr ignores it
    fails_before_work([*extra, override], tmp_path, match)


@pytest.mark.parametrize(
    "override",
    [
        "teacher.name=../../../x",
        "student.name=../../x",
        "student.name=a/b",
        "dataset.name=..",
        "label=x/../y",
    ],
)
def test_names_that_would_leave_their_folder_are_refused(tmp_path, override):
    key, value = override.split("=", 1)
    fails_before_work(
        [override], tmp_path, rf"^{key}='{re.escape(value)}' would leave its folder .*without '/' or '\.\.'"
    )


def test_a_gpu_asked_for_on_a_machine_without_one_is_refused_before_the_teacher(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    fails_before_work(
        ["trainer=gpu", "trainer.accelerator=gpu"],
        tmp_path,
        r"^trainer.accelerator=gpu, but this machine has no GPU .*pass trainer=cpu",
    )
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    fails_before_work(
        ["trainer=gpu", "trainer.accelerator=gpu", "trainer.devices=4"],
        tmp_path,
        r"^trainer.devices=4 asks for 4 GPUs, but this machine has 1; pass trainer.devices=1 or fewer",
    )


def test_a_bad_seed_still_gets_a_failure_record(tmp_path):
    cfg = compose_train([*FAST, "seed=abc"], tmp_path, tmp_path / "cache")
    with pytest.raises(KDXError) as err:
        validate_config(cfg)
    atomic_write_json(tmp_path / "metrics.json", failure_record(cfg, err.value).to_dict())
    record = strict_json(tmp_path / "metrics.json")
    assert record["status"] == "failed" and record["seed"] == "abc"
    assert record["error"].startswith("seed='abc' is not an integer")


# -- resume: from something, or an error ---------------------------------------------------------


def test_resume_from_last_without_a_last_checkpoint_is_an_error(tmp_path):
    fails_before_work(
        ["ckpt_path=last"], tmp_path, r"ckpt_path=last: this run's folder .* has no checkpoints/last.ckpt"
    )


def test_resume_from_a_missing_file_is_an_error(tmp_path):
    fails_before_work(
        [f"ckpt_path={tmp_path / 'gone.ckpt'}"], tmp_path, r"ckpt_path=.*gone.ckpt does not exist"
    )


def test_resume_from_a_run_folder_or_last_takes_its_last_checkpoint(tmp_path):
    run_dir = tmp_path / "earlier-run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"stand-in")
    cfg = compose_train([*FAST, f"ckpt_path={run_dir}"], tmp_path / "new", tmp_path / "cache")
    validate_config(cfg)
    assert cfg.ckpt_path == str(run_dir / "checkpoints" / "last.ckpt")
    # `last` in a run folder that has one (a rerun in the same folder) is that folder's
    cfg = compose_train([*FAST, "ckpt_path=last"], run_dir, tmp_path / "cache")
    validate_config(cfg)
    assert cfg.ckpt_path == str(run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(KDXError, match=r"is a folder without checkpoints/last.ckpt"):
        validate_config(compose_train([*FAST, f"ckpt_path={tmp_path}"], tmp_path / "x", tmp_path / "cache"))


# -- keys nothing reads ------------------------------------------------------------------------


def _added(overrides: list[str], tmp_path: Path):
    """(config, overrides, the config without the +keys), as kdx-train sees them."""
    plain = [o for o in overrides if not o.startswith("+")]
    return (
        compose_train(overrides, tmp_path, tmp_path / "cache"),
        overrides,
        compose_train(plain, tmp_path, tmp_path / "cache"),
    )


@pytest.mark.parametrize(
    ("added", "named"),
    [
        (
            "+optim.lr=-1",
            r"\+optim.lr: no kdx code reads 'optim.lr' .*the setting is optim.optimizer.lr or teacher.train.optim",
        ),
        (
            "+dataset.batch_size=0",
            r"\+dataset.batch_size: no kdx code reads .*the setting is dataset.datamodule.batch_size \(without",
        ),
        ("+learning_rate=0.1", r"\+learning_rate: no kdx code reads 'learning_rate' .*the top level"),
        ("+optim.new.lr=1", r"no kdx code reads 'optim.new'"),
        (
            "+student.model.width=3",
            r"student.model.width is not read: kdx.models.small.MLP takes no argument",
        ),
        (  # the auto-teacher's recipe counts epochs; the student's trainer.max_epochs is not it
            "+teacher.train.max_epochs=3",
            r"\+teacher.train.max_epochs: no kdx code reads .*the setting is teacher.train.epochs \(without",
        ),
    ],
)
def test_keys_added_with_plus_that_nothing_reads_are_errors(tmp_path, added, named):
    with pytest.raises(KDXError, match=named):
        validate_config(*_added([*FAST, added], tmp_path))


def test_a_misplaced_teacher_epoch_count_is_not_sent_to_the_student_trainer(tmp_path):
    with pytest.raises(KDXError) as err:
        validate_config(*_added([*FAST, "+teacher.train.max_epochs=3"], tmp_path))
    assert "trainer.max_epochs" not in str(err.value).split("remove it", 1)[1]


# -- token data with a model that reads tensors ------------------------------------------------


@pytest.mark.parametrize(
    ("models", "match"),
    [
        (  # the defaults: an MLP student and a CNN teacher, both refused in the same line
            [],
            r"^student=mlp reads tensors, but dataset=synthetic_text gives batches of token ids; pick a "
            r"student made for this data \(a text model, e.g. student=bert_l2_h32 .*; teacher=cnn1d reads tensors",
        ),
        (["student=bert_l2_h32"], r"^teacher=cnn1d reads tensors, .*pick a teacher made for this data"),
        (["student=resnet8", "teacher=none", "method=none"], r"^student=resnet8 reads tensors"),
    ],
)
def test_token_data_with_a_model_that_reads_tensors_is_refused_before_any_work(tmp_path, models, match):
    fails_before_work(["dataset=synthetic_text", *models], tmp_path, match)


def test_token_data_with_text_models_passes_and_its_max_length_is_named(tmp_path):
    text = ["dataset=synthetic_text", "student=bert_l2_h32", "teacher=bert_l2_h64"]
    validate_config(compose_train([*FAST, *text], tmp_path, tmp_path / "cache"))
    fails_before_work(
        [*text, "dataset.datamodule.max_length=0"],
        tmp_path,
        r"^dataset.datamodule.max_length=0 cannot hold a sentence; pass an integer >= 2",
    )


def test_keys_added_with_plus_that_are_read_pass(tmp_path):
    # passed on whole (the teacher recipe's method arguments) or taken by the target's **kwargs (timm)
    validate_config(*_added([*FAST, "+teacher.train.method_args.alpha=0.5"], tmp_path))
    validate_config(*_added([*FAST, "student=timm", "+student.model.drop_rate=0.1"], tmp_path))
    # one more callback: instantiated like its siblings; its own keys meet its signature
    probe = "+callbacks.probe._target_=kdx.callbacks.TrainingThroughput"
    validate_config(*_added([*FAST, probe], tmp_path))
    with pytest.raises(
        KDXError, match=r"callbacks.probe.every is not read: kdx.callbacks.TrainingThroughput"
    ):
        validate_config(*_added([*FAST, probe, "+callbacks.probe.every=2"], tmp_path))


def test_a_display_name_is_not_a_model_choice(tmp_path):
    # student=timm derives student.name from student.model.name: setting the name picks nothing
    cfg = compose_train([*FAST, "student=timm", "student.name=not_a_timm_model"], tmp_path, tmp_path / "c")
    with pytest.raises(KDXError, match=r"to choose the model pass student.model.name=not_a_timm_model"):
        validate_config(cfg, ["student=timm", "student.name=not_a_timm_model"], None)
    # ... and the model's name is checked against timm's registry
    cfg = compose_train(
        [*FAST, "student=timm", "student.model.name=not_a_timm_model"], tmp_path, tmp_path / "c"
    )
    with pytest.raises(KDXError, match=r"student.model.name=not_a_timm_model is not a timm"):
        validate_config(cfg, [], None)
    # a fixed display name (student=mlp) may be renamed: it is a label, not a choice
    validate_config(
        compose_train([*FAST, "student.name=tiny"], tmp_path, tmp_path / "c"), ["student.name=tiny"], None
    )


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_added_key_exits_2_with_one_line_and_a_failure_record(tmp_path):
    proc = kdx("+optim.lr=-1", root=tmp_path, cache=tmp_path / "cache", timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdx: error:")]
    assert errors == [errors[0]] and "no kdx code reads 'optim.lr'" in errors[0]
    (path,) = tmp_path.glob("logs/**/train/runs/*/metrics.json")
    record = strict_json(path)
    assert record["status"] == "failed" and record["error_type"] == "KDXError"
    assert "optim.optimizer.lr" in record["error"]  # the full message, with the fix
    assert Path(record["log"]).is_file() and "no kdx code reads" in Path(record["log"]).read_text()
    assert not (tmp_path / "cache").exists()  # nothing generated, no teacher trained


# -- no silent success during training ------------------------------------------------------------


def test_a_diverging_loss_stops_the_run_as_diverged(tmp_path):
    # Adam at lr 1e9: the loss stays finite but runs to ~1e30 within a few steps
    cfg = compose_train(
        [*NO_TEACHER, "optim.optimizer.lr=1e9", "trainer.log_every_n_steps=2"], tmp_path, tmp_path / "cache"
    )
    from kdx.train import run

    with pytest.raises(
        DivergenceError, match=r"the training loss diverged: .* over 1000x its first value"
    ) as err:
        run(cfg)
    record = failure_record(cfg, err.value).to_dict()
    assert record["status"] == "diverged" and "lower optim.optimizer.lr" in record["error"]


def test_a_student_at_chance_for_the_whole_run_ends_no_learning_with_its_figures(tmp_path):
    # lr 1e-12 (lr 0 is refused before any work): the student never leaves its initial accuracy;
    # the whole validation split is validated (debug=limit validates 2 batches: not judged)
    cfg = compose_train(
        [*NO_TEACHER, "optim.optimizer.lr=1e-12", "trainer.limit_val_batches=1.0"],
        tmp_path,
        tmp_path / "cache",
    )
    with pytest.raises(SystemExit) as stop:
        run_job(cfg)
    assert stop.value.code == 2  # a user error's exit code, like a diverged run
    metrics = strict_json(tmp_path / "metrics.json")
    assert metrics["status"] == "no_learning" and metrics["error_type"] == "NoLearningError"
    (warning,) = [w for w in metrics["warnings"] if "chance level" in w]
    assert warning == metrics["error"] and "over 2 validations" in warning
    assert "is not significantly above the majority class's" in warning and "chance_alpha" in warning
    # the figures it reached and the checkpoints stay: a reader sees what the run did
    assert 0 <= metrics["student/acc"] <= 1 and metrics["monitor/best"] is not None
    assert Path(metrics["student/best_ckpt"]).is_file() and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert "log" in metrics  # the log file of a Hydra run (none in-process)
    assert not list(tmp_path.glob(".*.tmp")) and not list(
        tmp_path.glob("metrics.json.*")
    )  # written atomically
    # the test's own figures: the best validation accuracy is at chance on this split
    monitor = ChanceTest(*_val_counts(cfg))
    assert monitor.judges and monitor.at_chance(metrics["student/val_acc_best"])


def _val_counts(cfg) -> tuple[int, int]:
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.dataset.datamodule)
    datamodule.prepare_data()
    datamodule.setup("fit")
    targets = datamodule.val_targets()
    return int(targets.numel()), int(torch.bincount(targets).max())


def test_chance_test_golden_values():
    # SST-2's dev split: 872 sentences, 444 positive: the majority class scores p0 = 444/872 = 50.92 %.
    # By hand (normal approximation with continuity correction): sd = sqrt(872 p0 (1 - p0)) = 14.762,
    # z(0.999) = 3.090, so k >= 444 + 0.5 + 3.090 * 14.762 = 490.1 correct: 491/872 = 56.31 %.
    sst2 = ChanceTest(examples=872, majority=444, alpha=0.001)
    assert sst2.judges and sst2.rate == pytest.approx(0.50917, abs=1e-5)
    assert sst2.threshold() == 491 / 872
    # scipy's exact tail agrees: 491 correct rejects at 0.001, 490 does not
    assert binom.sf(490, 872, 444 / 872) < 0.001 <= binom.sf(489, 872, 444 / 872)
    assert sst2.at_chance(0.509)  # the collapse seen on SST-2: the majority class
    assert sst2.at_chance(490 / 872) and not sst2.at_chance(491 / 872)
    assert not sst2.at_chance(0.74)  # an honest run (1.5 x 1/classes called it chance)
    # a split so small that only a perfect score could be significant is never judged: 12 examples
    # of 2 classes, 6 each: 12/12 has p = 0.5**12 = 0.00024 but 11/12 has (1 + 12) / 4096 = 0.0032;
    # 8 examples, 3 of one class: 7/8 has 8 * 0.375**7 * 0.625 + 0.375**8 = 0.0056
    for small in (ChanceTest(12, 6), ChanceTest(12, 7), ChanceTest(8, 3), ChanceTest(1, 1), ChanceTest(0, 0)):
        assert not small.judges and small.threshold() is None
        assert not small.at_chance(0.0) and not small.at_chance(1.0)
    # the first 2-class split judged: 14 examples, 13/14 has (1 + 14) / 2**14 = 0.00092 < 0.001
    assert ChanceTest(14, 7).judges and ChanceTest(14, 7).threshold() == 13 / 14
    # 10 classes, 1000 examples, the largest class 112: p0 = 11.2 %, not 1/classes
    ten = ChanceTest.of(torch.tensor([0] * 112 + [c for c in range(1, 10) for _ in range(98)]))
    assert (ten.examples, ten.majority) == (994, 112)
    assert ten.at_chance(0.12) and not ten.at_chance(0.16)


def test_divergence_monitor_thresholds():
    monitor = DivergenceMonitor(loss_factor=10)
    # SST-2's dev split: at chance below 56.3 %
    monitor._best_acc, monitor._test, monitor._validations = 0.509, ChanceTest(872, 444), 3
    verdict = monitor.verdict()
    assert isinstance(verdict, NoLearningError) and verdict.status == "no_learning"
    assert "chance level" in monitor.report()["warnings"][0]
    assert "50.9 % is not significantly above the majority class's 50.9 % of the 872" in str(verdict)
    monitor._best_acc = 0.74
    assert monitor.report() == {} and monitor.verdict() is None
    # a validation over part of the split is not judged
    monitor._best_acc, monitor._partial = 0.509, True
    assert monitor.verdict() is None
    monitor._partial = False
    with pytest.raises(ValueError, match="loss_factor=1.0 must be > 1"):
        DivergenceMonitor(loss_factor=1.0)
    with pytest.raises(ValueError, match="chance_alpha=1.5 must lie in"):
        DivergenceMonitor(chance_alpha=1.5)
    # a resumed run goes on with the first run's reference and its validations so far
    monitor._best_acc = 0.16
    monitor._reference = torch.tensor(2.5)
    resumed = DivergenceMonitor(loss_factor=10)
    resumed.load_state_dict(monitor.state_dict())
    assert (float(resumed._reference), resumed._seen, resumed._best_acc, resumed._validations) == (
        2.5,
        3,
        0.16,
        3,
    )
    # ... but a run's own state wins (Lightning restores callbacks for test(ckpt_path=best) too)
    resumed.load_state_dict({"reference": 9.0, "validations": 1})
    assert (float(resumed._reference), resumed._validations) == (2.5, 3)


def test_the_teacher_check_uses_the_same_criterion():
    cfg = OmegaConf.create({"teacher": {"name": "cnn1d"}, "dataset": {"name": "sst2"}})
    sst2 = ChanceTest(872, 444)
    (warning,) = _setup_warnings(cfg, nn.Linear(1, 1), None, {"teacher/val_acc": 0.509}, sst2)
    assert warning.startswith("teacher=cnn1d validates at 50.9 % is not significantly above")
    assert warning.endswith(
        "distilling from it teaches nothing; train it longer or pass a better teacher.ckpt"
    )
    # a 74.7 % teacher on 2 classes teaches (1.5 x 1/classes called it "teaches nothing")
    assert _setup_warnings(cfg, nn.Linear(1, 1), None, {"teacher/val_acc": 0.747}, sst2) == []


def test_nan_inputs_are_named_as_inputs(tmp_path):
    # the synthetic data's noise scale NaN makes every input NaN: the data, not the learning rate
    overrides = [*NO_TEACHER, "dataset=synthetic", "dataset.datamodule.noise=nan"]
    with pytest.raises(NonFiniteLossError, match=r"the training inputs hold NaN or infinite values") as err:
        run_train(overrides, tmp_path, tmp_path / "cache")
    assert "lr" not in str(err.value)


def test_non_finite_teacher_outputs_are_named_as_such(tmp_path, cache_dir):
    # finite weights (the load check passes) whose forward pass overflows float32 (1e20 x 1e20 ...)
    teacher = CNN1D(10, (1, 40))
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.mul_(1e20)
    torch.save(teacher.state_dict(), tmp_path / "loud.pt")
    with pytest.raises(
        NonFiniteLossError, match=r"the teacher's outputs became NaN or infinite .* on finite inputs"
    ):
        run_train([*FAST, f"teacher.ckpt={tmp_path / 'loud.pt'}"], tmp_path / "run", cache_dir)


# -- checkpoint files: messages that point the right way ------------------------------------------


def test_random_bytes_are_not_a_pytorch_checkpoint(tmp_path):
    # seeded bytes: the unpickler's complaint depends on them, and the test must not
    (tmp_path / "noise.pt").write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(
        KDXError, match=r"noise.pt is not a PyTorch checkpoint \(torch: .+\); pass a file"
    ) as err:
        load_weights(CNN1D(10, (1, 40)), tmp_path / "noise.pt")
    assert "weights_only=False" not in str(err.value)  # kdx offers no such option


def test_a_truncated_checkpoint_is_named_truncated(tmp_path):
    torch.save(CNN1D(10, (1, 40)).state_dict(), tmp_path / "full.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:2000])
    with pytest.raises(KDXError, match=r"cut.pt is a damaged or truncated PyTorch checkpoint \(torch: "):
        load_weights(CNN1D(10, (1, 40)), tmp_path / "cut.pt")


def test_a_conv_width_mismatch_is_not_called_a_class_count(tmp_path):
    torch.save(CNN1D(10, (1, 40), channels=(16, 64, 64)).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(KDXError, match=r"has shape \(16, 1, .*the layers differ in size") as err:
        load_weights(CNN1D(10, (1, 40)), tmp_path / "narrow.pt")
    assert "class" not in str(err.value)


def test_a_nan_teacher_weight_is_named(tmp_path):
    state = CNN1D(10, (1, 40)).state_dict()
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(KDXError, match=rf"1 weight tensors hold NaN or infinite values \(e.g. '{key}'\)"):
        load_weights(CNN1D(10, (1, 40)), tmp_path / "nan.pt")


def test_failure_record_keeps_the_full_message(tmp_path):
    cfg = compose_train(FAST, tmp_path, tmp_path / "cache")
    message = "teacher checkpoint x.pt does not fit:\n  missing: a.weight\n  unexpected: b.weight"
    record = failure_record(cfg, KDXError(message)).to_dict()
    assert record["error"] == message and record["status"] == "failed"


# -- the auto-teacher cache heals ------------------------------------------------------------------


def test_a_cached_teacher_is_reused_read_only_and_a_truncated_one_retrained(
    tmp_path, cache_dir, monkeypatch, capfd
):
    overrides = [*FAST, "teacher.train.seed=21"]
    assert run_train(overrides, tmp_path / "a", cache_dir)["teacher/source"] == "trained"
    path = cached_teacher_path(compose_train(overrides, tmp_path, cache_dir))
    # reuse only reads: no lock taken, nothing written (so a read-only cache holding it works)
    before = {p: p.stat().st_mtime_ns for p in path.parent.rglob("*")}
    with monkeypatch.context() as patch:
        patch.setattr(
            "kdx.teacher.auto._lock", lambda path: pytest.fail(f"a lock was taken for cached {path}")
        )
        assert run_train(overrides, tmp_path / "b", cache_dir)["teacher/source"] == "cache"
    assert {p: p.stat().st_mtime_ns for p in path.parent.rglob("*")} == before
    # a truncated entry at the right key: moved aside, said why, retrained
    path.write_bytes(path.read_bytes()[:1000])
    third = run_train(overrides, tmp_path / "c", cache_dir)
    assert third["teacher/source"] == "retrained"
    assert "damaged or truncated" in third["teacher/retrained_because"]
    assert f"cached teacher {path} is unusable: " in capfd.readouterr().err
    (aside,) = path.parent.glob(f"{path.stem}.bad-*.pt")
    assert aside.stat().st_size == 1000 and aside.with_suffix(".json").is_file()
    assert (aside.with_suffix("") / "metrics.json").is_file()  # the old teacher run's folder went with it
    load_weights(CNN1D(10, (1, 40)), path)  # the new entry is whole


def test_a_stale_cached_teacher_from_other_model_code_is_retrained(tmp_path, cache_dir):
    overrides = [*FAST, "teacher.train.seed=22"]
    run_train(overrides, tmp_path / "a", cache_dir)
    record_path = cached_teacher_path(compose_train(overrides, tmp_path, cache_dir)).with_suffix(".json")
    record = json.loads(record_path.read_text())
    record["key"]["model_code"] = "0123456789ab"  # as written by a kdx whose CNN1D code differed
    record_path.write_text(json.dumps(record))
    second = run_train(overrides, tmp_path / "b", cache_dir)
    assert second["teacher/source"] == "retrained"
    assert second["teacher/retrained_because"].startswith(
        "it was trained with other model code (fingerprint 0123"
    )


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        written = atomic_write_json(tmp_path / "metrics.json", {"a": float("nan")})
    finally:
        os.umask(previous)
    assert written.stat().st_mode & 0o777 == 0o666 & ~umask  # 0644 / 0664, not mkstemp's 0600
    assert strict_json(written) == {"a": None}


# -- checkpoints written atomically in their own folder ----------------------------------------------


def test_checkpoints_are_written_in_their_own_folder(tmp_path, monkeypatch):
    # a temp folder that does not exist: a writer that went through it (fsspec's transaction) fails
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "no-such-tmp"))
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, target)
    assert torch.load(target, weights_only=True)["epoch"] == 3
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temporary file left
    # and every kdx trainer uses it
    cfg = compose_train(FAST, tmp_path, tmp_path / "cache")
    with open_dict(cfg):
        cfg.trainer.default_root_dir = str(tmp_path)
    from kdx.pipeline.build import make_trainer

    trainer = make_trainer(cfg.trainer, logger=False, callbacks=[])
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
