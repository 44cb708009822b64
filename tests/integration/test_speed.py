"""Speed switches and the no-sync rule: no host–device sync inside a training step, bf16-mixed for
every method, channels_last, torch.compile with checkpoints and resume, the bench's overhead section."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from conftest import CONF_DIR, HostReads, run_train
from kdx.data.base import KDDataModule, tensor_dataset
from kdx.methods.kd import KD
from kdx.models.small import CNN1D, MLP
from kdx.module import DistillationModule

# kdx's step code: the module, the methods, the models' adapters, the teacher-output cache (the data
# modules' samplers work on host tensors they make themselves)
_SRC = Path(__file__).resolve().parents[2] / "src" / "kdx"
WATCHED = tuple(str(_SRC / part) for part in ("module.py", "methods", "models", "teacher_outputs.py"))

# the tiniest zoo pair on 8×8 synthetic images: every method's code path, little compute
TINY_PAIR = [
    "dataset=synthetic_cifar",
    "dataset.num_classes=10",
    "dataset.input_shape=[3,8,8]",
    "dataset.datamodule.num_train=16",
    "dataset.datamodule.num_val=8",
    "dataset.datamodule.num_test=8",
    "dataset.datamodule.batch_size=8",
    "teacher=resnet14",
    "student=resnet8",
    "optim=sgd",
]
# two training steps of kd on the tiny pair, checkpoints written, nothing else
SHORT_KD = [
    *TINY_PAIR,
    "debug=limit",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "test=false",
    "method=kd",
    "callbacks.diagnostics.enabled=false",
    "print_summary=false",
]


def _count_in_training_steps(monkeypatch) -> HostReads:
    counter = HostReads(monkeypatch, WATCHED)
    step = DistillationModule.training_step

    def watched(self, batch, batch_idx):
        counter.active = True
        try:
            return step(self, batch, batch_idx)
        finally:
            counter.active = False

    monkeypatch.setattr(DistillationModule, "training_step", watched)
    return counter


class _Waves(KDDataModule):
    num_classes, input_shape = 10, (1, 40)

    def setup(self, stage=None):
        generator = torch.Generator().manual_seed(0)
        self.train_set = tensor_dataset(
            torch.randn(32 * 30, 1, 40, generator=generator), torch.arange(960) % 10
        )
        self.val_set = self.train_set


def test_nan_check_and_logging_sync_once_per_check_not_per_step(monkeypatch):
    """30 steps, log_every_n_steps = check every 10: kdx reads values on the host only at steps 10, 20
    and 30 (the logged loss, one `cpu` each; the NaN check, one `tolist` each) and at the epoch's end
    (the NaN check again), never inside a step or between those steps."""
    L.seed_everything(0, verbose=False)
    counter = HostReads(monkeypatch, WATCHED)
    counter.active = True
    module = DistillationModule(
        MLP(10, (1, 40)), KD(), 10, lambda p: torch.optim.SGD(p, lr=0.01), teacher=CNN1D(10, (1, 40))
    )
    trainer = L.Trainer(
        max_epochs=1,
        log_every_n_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=_Waves(batch_size=32))
    assert trainer.global_step == 30
    assert [c.split(" ")[0] for c in counter.calls] == ["cpu", "tolist"] * 3 + ["tolist"], counter.calls


def _weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_channels_last_trains_like_contiguous(tmp_path, cache_dir):
    run_train([*SHORT_KD, "channels_last=false"], tmp_path / "plain", cache_dir)
    run_train([*SHORT_KD, "channels_last=true"], tmp_path / "nhwc", cache_dir)
    a, b = (
        _weights(tmp_path / "plain/checkpoints/last.ckpt"),
        _weights(tmp_path / "nhwc/checkpoints/last.ckpt"),
    )
    assert a.keys() == b.keys()
    for key in a:  # the same arithmetic in another memory layout: equal up to summation order
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4, msg=key)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a)  # weights, not an empty state


def test_compile_keeps_outputs_checkpoints_and_resume(tmp_path, cache_dir):
    """torch.compile of student and frozen teacher: the adapter's outputs equal the eager model's,
    checkpoint keys are the eager ones, and a compiled run resumes from its last.ckpt. The backend is
    aot_eager: TorchDynamo's capture and AOTAutograd's joint graph, as with `compile=true`, without
    inductor's C++ code generation (minutes on this CPU; `kdx-bench variants=[compile]` runs it)."""
    from kdx.models.cifar.resnet import resnet8

    torch.manual_seed(0)
    module = DistillationModule(
        resnet8(num_classes=10),
        KD(),
        10,
        lambda p: None,
        teacher=resnet8(num_classes=10),
        compile="aot_eager",
    )
    x = torch.randn(4, 3, 8, 8)
    compiled = module.student.eval()(x, ("logits", "embedding", "stages"))
    eager = module.student.model.eval().extract(x, stages=True)  # the wrapped model itself is not compiled
    torch.testing.assert_close(compiled.logits, eager.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled.embedding, eager.embedding, atol=1e-5, rtol=1e-5)
    assert len(compiled.stages) == len(eager.stages) > 0
    for a, b in zip(compiled.stages, eager.stages):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert module.teacher(x).logits.shape == (4, 10)  # the frozen teacher is compiled too

    first = run_train([*SHORT_KD, "compile=aot_eager"], tmp_path / "first", cache_dir)
    assert first["status"] == "ok"
    last = tmp_path / "first/checkpoints/last.ckpt"
    keys = _weights(last).keys()
    assert keys and not any("_orig_mod" in k for k in keys)
    assert all(k.startswith(("student.", "method.")) for k in keys)  # the frozen teacher is left out
    resumed = run_train(
        [*SHORT_KD, "compile=aot_eager", "trainer.max_epochs=2", f"ckpt_path={last}"],
        tmp_path / "resumed",
        cache_dir,
    )
    assert resumed["status"] == "ok" and resumed["epochs"] == 2


def test_unknown_compile_backend_is_one_clear_error():
    from kdx.errors import KDXError
    from kdx.pipeline.switches import compile_switch

    assert compile_switch("false") is False and compile_switch(True) is True
    assert compile_switch("aot_eager") == "aot_eager"
    with pytest.raises(KDXError, match="compile='fast' is neither true/false nor a torch.compile backend"):
        compile_switch("fast")


def test_bench_overhead_section_reports_its_fields():
    from kdx import bench

    cfg = OmegaConf.create(
        {
            "seed": 0,
            "accelerator": "cpu",
            "precision": "32-true",
            "log_every_n_steps": 10,
            "optim": {"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01}},
            "overhead": {"batch_size": 8, "warmup_steps": 2, "steps": 6, "rounds": 2},
        }
    )
    bench._use_clock(cfg, torch.device("cpu"))
    result = bench.overhead(cfg, torch.device("cpu"))
    assert result["step_ms_plain"] > 0 and result["step_ms_lightning"] > 0 and result["step_ms_kdx"] > 0
    assert {"overhead_ms_over_plain", "overhead_ms_over_lightning"} <= result.keys()
    assert result["overhead_rounds"] == 2 and result["overhead_batch_size"] == 8


def test_bench_precomputed_teacher_side_trains_the_same_student_as_the_live_loop():
    """The cache's ceiling in kdx-bench is the plain loop minus the teacher's forward, nothing else: from
    the same start, both sides leave the student with the same weights."""
    from kdx import bench

    cfg = OmegaConf.create(
        {"optim": {"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}}}
    )
    torch.manual_seed(0)
    student0, teacher = MLP(10, (1, 40)), CNN1D(10, (1, 40))
    dataset = bench._data(0, 8 * 5, (1, 40), 10)
    trained = {}
    for precomputed in (False, True):
        student = copy.deepcopy(student0)
        bench.plain_segment(
            cfg, student, teacher, torch.device("cpu"), 1, dataset, 8, "32-true", precomputed=precomputed
        )
        trained[precomputed] = torch.cat([p.detach().flatten() for p in student.parameters()])
    start = torch.cat([p.detach().flatten() for p in student0.parameters()])
    assert not torch.equal(trained[False], start)  # the loop trained
    torch.testing.assert_close(trained[True], trained[False], rtol=0, atol=1e-6)


def test_bench_teacher_cache_override_is_read():
    """`kdx-bench teacher.cache=views` cannot be measured on fixed random batches: one clear error."""
    from kdx import bench

    cfg = OmegaConf.create(
        {"seed": 0, "accelerator": "cpu", "variants": [], "teacher": {"cache": "views"}, "clock": "auto"}
    )
    with pytest.raises(ValueError, match="teacher.cache=views.*teacher.cache=exact"):
        bench.bench(cfg)


def test_channels_last_auto_picks_the_layout_per_device_and_model():
    """auto: channels_last on a CPU and at 16-bit on a GPU, contiguous at 32-bit on a GPU; only
    models with Conv2d layers change; a misspelt value is one clear error."""
    from kdx.errors import KDXError
    from kdx.models.cifar.resnet import resnet8
    from kdx.pipeline.build import make_module
    from kdx.pipeline.switches import channels_last_switch

    assert channels_last_switch("auto", "cpu", "32-true") is True
    assert channels_last_switch("auto", "cuda", "32-true") is False
    assert channels_last_switch("auto", "gpu", "bf16-mixed") is True
    assert channels_last_switch("auto", "mps", "32-true") is False
    assert channels_last_switch(False, "cpu", "32-true") is False
    assert channels_last_switch("true", "cuda", "32-true") is True
    with pytest.raises(KDXError, match="channels_last='yes'.*auto, true or false"):
        channels_last_switch("yes", "cpu", "32-true")

    cfg = OmegaConf.create(
        {
            "channels_last": "auto",
            "trainer": {"accelerator": "cpu", "precision": "32-true"},
            "dataset": {"num_classes": 10},
            "student": {},
            "teacher": {"cache": "off"},
        }
    )
    conv = make_module(cfg, resnet8(num_classes=10), KD(), resnet8(num_classes=10))
    assert conv.channels_last
    for model in (conv.student, conv.teacher):
        weight = next(m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    vector = make_module(cfg, MLP(10, (1, 40)), KD(), CNN1D(10, (1, 40)))
    assert not vector.channels_last  # no Conv2d: nothing to change, and the cache key stays as it was


def test_bench_text_pair_reports_its_ratio_and_the_gains_of_length_grouping():
    """`kdx-bench pair=text` at tiny sizes: the bench's own config, every side, the ratio fields."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from kdx import bench, bench_text

    tiny = ["text.batch_size=8", "text.max_length=32", "text.pool_batches=8", "text.warmup_steps=1"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("bench", overrides=["pair=text", *tiny, "text.steps=2", "text.rounds=1"])
    GlobalHydra.instance().clear()
    result = bench.bench(cfg)
    assert (
        result["pair"] == "text" and result["student"] == "bert_l2_h32" and result["teacher"] == "bert_l2_h64"
    )
    for side in ("plain_kd", "lightning", "kdx", "kdx_random", "kdx_fixed"):
        assert result[f"{side}_samples_per_s"] > 0
    assert result["ratio_kdx_over_plain_kd"] == pytest.approx(
        result["kdx_samples_per_s"] / result["plain_kd_samples_per_s"], rel=1e-2
    )
    assert result["ratio_kdx_over_lightning"] == pytest.approx(
        result["kdx_samples_per_s"] / result["lightning_samples_per_s"], rel=1e-2
    )
    assert result["gain_grouped_over_fixed"] == pytest.approx(
        result["kdx_samples_per_s"] / result["kdx_fixed_samples_per_s"], rel=1e-2
    )
    # fixed padding computes every batch at max_length; grouping pads least
    assert result["mean_batch_tokens_fixed"] == 32
    assert result["mean_batch_tokens_grouped"] < result["mean_batch_tokens_random"] < 32
    assert "length grouping:" in bench.table(result)
    # the hard-coded SST-2 histogram: 67,349 sentences, mean 11.4 tokens
    lengths = torch.arange(len(bench_text.SST2_LENGTHS)) + bench_text.SHORTEST
    weights = torch.tensor(bench_text.SST2_LENGTHS, dtype=torch.float)
    assert int(weights.sum()) == 67349 and float((lengths * weights).sum() / weights.sum()) == pytest.approx(
        11.41, abs=0.01
    )


def test_per_step_gives_each_sides_added_milliseconds_and_its_ratio_in_every_round():
    """Hand-derived: batch 64; the plain loop's median 6,400 samples/s is a 10 ms step, kdx's median
    6,250 a 10.24 ms one: 0.24 ms added, which leaves 0.97 of the plain loop from a step of
    0.24 · 0.97 / 0.03 = 7.76 ms on; the rounds pair 5000/6000, 6250/6400, 8000/6800."""
    from kdx.bench_loop import per_step, per_step_lines

    result = per_step({"plain": [6000, 6400, 6800], "kdx": [5000, 6250, 8000]}, batch_size=64)
    assert result["step_ms_plain"] == pytest.approx(10.0)
    assert result["step_ms_kdx"] == pytest.approx(10.24)
    assert result["added_ms_kdx"] == pytest.approx(0.24)
    assert result["goal_step_ms_kdx"] == pytest.approx(7.76)
    assert result["rounds_kdx"] == [0.8333, 0.9766, 1.1765]
    line = per_step_lines(result, {"kdx": "kdx"})[1]
    assert "+0.240 ms" in line and "0.8333-1.1765" in line and "7.8 ms step" in line


FAULTS_PER_STEP = """
import resource, sys, torch
from kdx.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
torch.set_num_threads(1)
w = torch.randn(64, 512, requires_grad=True)
def step():  # a step's worth of 2 MiB tensors, like a causal LM's (B·L, V) logits
    logits = torch.randn(32 * 32, 64) @ w
    (logits.log_softmax(-1).exp() * logits).sum().backward()
for _ in range(15):  # the heap grows to the steps' peak
    step()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 40)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_retaining_freed_memory_stops_the_page_faults_of_each_step():
    """``cpu_allocator=retain``: the same steps, each in a fresh process, under glibc's own policy and
    with freed memory kept: the page faults a step takes fall to a fraction (each fault is a page the
    kernel maps and zeroes again)."""
    faults = {}
    for policy in ("system", "retain"):
        out = subprocess.run(
            [sys.executable, "-c", FAULTS_PER_STEP, policy], capture_output=True, text=True, check=True
        )
        faults[policy] = float(out.stdout.strip().splitlines()[-1])
    assert faults["retain"] * 5 < faults["system"], faults
