import json

from conftest import FAST, run_train


def test_kd_fast_dev_run_writes_metrics(tmp_path, cache_dir):
    metrics = run_train([*FAST, "method=kd"], tmp_path, cache_dir)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["method"] == "kd"
    for key in (
        "student/acc",
        "student/acc_best",
        "teacher/acc",
        "fidelity/kl",
        "fidelity/agreement",
        "student/ece",
        "teacher/ece",
        "time/fit_s",
        "throughput/train_samples_per_s",
        "seed",
        "teacher/sha256",
    ):
        assert key in on_disk, key
    assert 0.0 <= metrics["student/acc"] <= 1.0
    assert len(on_disk["teacher/sha256"]) == 64


def test_wandb_logs_offline_without_an_account(tmp_path, cache_dir, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    metrics = run_train(["debug=limit", "logger=wandb", "print_summary=false"], tmp_path, cache_dir)
    assert metrics["status"] == "ok"
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb did not write an offline run"
