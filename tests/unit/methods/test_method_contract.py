"""The method contract, checked for every registered method (``kdx.methods.base.METHODS``).

Each method trains a tiny CNN1D pair (a token-level method: a tiny GPT-2 pair on packed blocks) for two bf16-mixed steps in a real Lightning fit, through
:class:`~kdx.module.DistillationModule` and nothing else, and these hold:

* the terms it returns hold ``"loss"`` and only scalar tensors, all finite under bf16 autocast;
* gradients reach only what the method trains: the student and the method's own parameters, the
  teacher only when ``teacher_use`` is ``TRAINED``; some student parameter gets a non-zero gradient;
* a frozen teacher is bit-identical after the fit (a trained one has moved);
* no host sync inside a training step: no call of kdx's step code reads a tensor's value on the host
  (on a GPU each would be a device sync; counted here on CPU by wrapping the reading methods);
* the method's state dict round-trips into a fresh instance set up on the same pair.

Per-method tests keep only the golden values and the method's own identities.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

import kdx
from conftest import HostReads
from kdx.data.base import KDDataModule
from kdx.data.lm import BlockDataset
from kdx.data.synthetic import SyntheticDataModule
from kdx.methods.base import METHODS, TeacherUse
from kdx.models.causal_lm import causal_lm
from kdx.models.small import CNN1D
from kdx.module import DistillationModule

NUM_CLASSES, INPUT_SHAPE = 4, (1, 40)
# kdx's own step code: a host read made from these files inside a training step is a sync
_SRC = Path(kdx.__file__).parent
WATCHED = tuple(str(_SRC / part) for part in ("module.py", "context.py", "methods", "models"))
# the main phase from the first step (the init phases of ab, fsp and ft train the connectors alone)
MAIN_PHASE = {
    # CNN1D has no pre-activation definition: AB reads its post-activation stages here
    "ab": {"init_epochs": 0, "weight": 1.0, "features": "stages"},
    "fsp": {"init_epochs": 0, "weight": 1.0},
    "ft": {"init_epochs": 0},
    "kda": {"warm": 0},
    "gkd": {"lmbda": 1.0, "prompt_tokens": 4},  # the sampling path, in both steps
    "seqkd": {"prompt_tokens": 4},
}
# token-level methods (causal language models) train a tiny GPT-2 pair on packed blocks instead
VOCAB, BLOCK = 16, 10


def _method(name: str):
    return METHODS[name](**MAIN_PHASE.get(name, {}))


def _pair(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A thin student and a wider teacher (equal widths for FSP, which compares them layer by layer)."""
    torch.manual_seed(0)
    if METHODS[name].token_level:
        return _lm(8), _lm(16)
    student = CNN1D(NUM_CLASSES, INPUT_SHAPE, channels=(4, 8, 8))
    teacher = CNN1D(NUM_CLASSES, INPUT_SHAPE, channels=(4, 8, 8) if name == "fsp" else (8, 16, 16))
    return student, teacher


def _lm(width: int) -> torch.nn.Module:
    config = {"model_type": "gpt2", "n_embd": width, "n_layer": 1, "n_head": 2, "n_positions": 2 * BLOCK}
    return causal_lm(config=config, vocab_size=VOCAB)


class _Blocks(KDDataModule):
    """Random packed blocks of a 16-token vocabulary, the last one padded."""

    input_kind, num_classes = "lm", VOCAB

    def __init__(self):
        super().__init__(batch_size=16)

    def setup(self, stage=None) -> None:
        g = torch.Generator().manual_seed(0)
        blocks = torch.randint(0, VOCAB, (64, BLOCK + 1), generator=g)
        lengths = torch.full((64,), BLOCK + 1)
        lengths[-1] = 5
        self.train_set = BlockDataset(blocks, lengths)
        self.val_set = self.test_set = BlockDataset(blocks[:16], lengths[:16])


def _datamodule(name: str = "none"):
    if METHODS[name].token_level:
        return _Blocks()
    return SyntheticDataModule(
        input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES, num_train=64, num_val=16, num_test=16, batch_size=16
    )


class StepRecorder(L.Callback):
    """Records the terms of every step and the host reads inside it (by wrapping the method's and the
    module's ``training_step`` on their instances) and, after each batch, which parameters hold a
    gradient."""

    def __init__(self, reads: HostReads):
        self.reads = reads
        self.terms: list[dict[str, torch.Tensor]] = []
        self.with_grad: set[str] = set()
        self.nonzero_student_grad = False

    def on_fit_start(self, trainer, pl_module) -> None:
        method_step, module_step = pl_module.method.training_step, pl_module.training_step

        def recorded(batch, ctx):
            terms = method_step(batch, ctx)
            self.terms.append(terms)
            return terms

        def watched(batch, batch_idx):
            self.reads.active = True
            try:
                return module_step(batch, batch_idx)
            finally:
                self.reads.active = False

        pl_module.method.training_step, pl_module.training_step = recorded, watched

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for name, p in pl_module.named_parameters():
            if p.grad is not None:
                self.with_grad.add(name)
                if name.startswith("student.") and p.grad.abs().sum() > 0:
                    self.nonzero_student_grad = True


@pytest.fixture(scope="module")
def fits(tmp_path_factory) -> dict:
    """One fit per method, shared by the checks below (a fit is the expensive part)."""
    return {}


def _fit(name: str, fits: dict, tmp_path_factory, monkeypatch) -> dict:
    if name in fits:
        return fits[name]
    reads = HostReads(monkeypatch, WATCHED)
    student, teacher = _pair(name)
    method = _method(name)
    module = DistillationModule(
        student=student,
        method=method,
        num_classes=NUM_CLASSES,
        optimizer=partial(torch.optim.SGD, lr=0.05),
        teacher=teacher,
    )
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    recorder = StepRecorder(reads)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        precision="bf16-mixed",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
        default_root_dir=tmp_path_factory.mktemp(name),
    )
    trainer.fit(module, datamodule=_datamodule(name))
    optimised = {
        id(p) for optimizer in trainer.optimizers for group in optimizer.param_groups for p in group["params"]
    }
    fits[name] = {
        "module": module,
        "teacher_before": teacher_before,
        "student_before": student_before,
        "recorder": recorder,
        "host_reads": list(reads.calls),
        "optimised": {n for n, p in module.named_parameters() if id(p) in optimised},
        "steps": trainer.global_step,
    }
    return fits[name]


@pytest.fixture
def fitted(request, fits, tmp_path_factory, monkeypatch):
    return _fit(request.param, fits, tmp_path_factory, monkeypatch)


NAMES = sorted(METHODS)


def test_the_registry_holds_every_method():
    assert len(NAMES) >= 24 and {"none", "kd", "prokt", "backward", "kda", "rdim", "crd"} <= set(NAMES)
    for name in NAMES:
        cls = METHODS[name]
        assert cls.name == name and isinstance(cls.teacher_use, TeacherUse)
        if cls.teacher_use in (TeacherUse.LIVE, TeacherUse.TRAINED):
            assert cls.live_reason, f"{name} needs the live teacher and must say why (live_reason)"


@pytest.mark.parametrize("fitted", NAMES, indirect=True)
def test_terms_are_finite_scalars_with_a_loss_under_bf16(fitted):
    terms = fitted["recorder"].terms
    assert len(terms) == 2 and fitted["steps"] >= 2  # ProKT counts two optimizer steps a batch
    for step in terms:
        assert "loss" in step
        for key, value in step.items():
            assert isinstance(value, torch.Tensor) and value.dim() == 0, key
            assert torch.isfinite(value.float()), f"{key} = {value}"


@pytest.mark.parametrize("fitted", NAMES, indirect=True)
def test_gradients_reach_only_what_the_method_trains(fitted):
    module, recorder = fitted["module"], fitted["recorder"]
    trained = module.method.teacher_use is TeacherUse.TRAINED
    assert recorder.nonzero_student_grad, "the loss reached no student parameter"
    outside = recorder.with_grad - fitted["optimised"]
    assert not outside, f"gradients outside the optimizers: {sorted(outside)}"
    teacher_grads = {n for n in recorder.with_grad if n.startswith("teacher.")}
    assert bool(teacher_grads) == trained, sorted(teacher_grads)
    for name, p in module.teacher.named_parameters():
        assert p.requires_grad == trained, name


@pytest.mark.parametrize("fitted", NAMES, indirect=True)
def test_a_frozen_teacher_is_bit_identical_after_the_fit_and_the_student_moved(fitted):
    module, before = fitted["module"], fitted["teacher_before"]
    unchanged = all(torch.equal(v, before[k]) for k, v in module.teacher.state_dict().items())
    assert unchanged != (module.method.teacher_use is TeacherUse.TRAINED)
    moved = fitted["student_before"]
    assert any(not torch.equal(v, moved[k]) for k, v in module.student.state_dict().items())


@pytest.mark.parametrize("fitted", NAMES, indirect=True)
def test_no_host_sync_inside_a_training_step(fitted):
    assert fitted["host_reads"] == [], f"host reads inside the step: {fitted['host_reads']}"


@pytest.mark.parametrize("fitted", NAMES, indirect=True)
def test_state_dict_round_trip(fitted):
    module = fitted["module"]
    state = module.method.state_dict()
    fresh = _method(module.method.name)
    fresh.setup(module.student, module.teacher, _datamodule(module.method.name))
    fresh.load_state_dict(state)
    restored = fresh.state_dict()
    assert set(restored) == set(state)
    for key, value in state.items():
        assert _same(restored[key], value), key


def _same(a, b) -> bool:
    """Equal tensors, bit for bit, inside the extra state's plain containers too."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b
