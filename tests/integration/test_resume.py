"""Resuming from last.ckpt ends exactly where the uninterrupted run ends."""

from __future__ import annotations

import torch

from conftest import run_train

SHORT = [
    "debug=limit",
    "method=kd",
    "logger=csv",
    "callbacks.diagnostics.enabled=false",
    "print_summary=false",
]


def _student_weights(ckpt):
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("student.")}


def test_resume_matches_uninterrupted_run(tmp_path, cache_dir):
    straight = run_train(SHORT, tmp_path / "straight", cache_dir)
    # the same run, cut after the first epoch (4 batches), then resumed from its last.ckpt
    run_train([*SHORT, "+trainer.max_steps=4"], tmp_path / "cut", cache_dir)
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0
    resumed = run_train([*SHORT, f"ckpt_path={last}"], tmp_path / "resumed", cache_dir)
    assert resumed["epochs"] == straight["epochs"] == 2
    a = _student_weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = _student_weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert resumed["student/acc"] == straight["student/acc"]
