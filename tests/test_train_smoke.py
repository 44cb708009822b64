import json

from conftest import FAST, run_train


def test_kd_fast_dev_run_writes_metrics(tmp_path, cache_dir):
    metrics = run_train([*FAST, "method=kd"], tmp_path, cache_dir)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["method"] == "kd"
    for key in ("student/acc", "student/acc_best", "teacher/acc", "fidelity/kl", "fidelity/agreement",
                "student/ece", "teacher/ece", "time/fit_s", "throughput/train_samples_per_s", "seed",
                "teacher/sha256"):
        assert key in on_disk, key
    assert 0.0 <= metrics["student/acc"] <= 1.0
    assert len(on_disk["teacher/sha256"]) == 64
