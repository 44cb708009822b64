"""teacher.cache: stored teacher outputs equal live ones, a cached run trains like an uncached one,
views replay bit for bit, and methods that need the live teacher refuse."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from conftest import compose_train, run_train
from kdx.data.base import IndexedDataset, KDDataModule, tensor_dataset
from kdx.data.replay import CropFlipReplay, ViewReplayDataset, view_of
from kdx.data.sampling import ViewSampler
from kdx.errors import KDXError
from kdx.methods.base import METHODS
from kdx.models.base import EMBEDDING, LOGITS, STAGES
from kdx.models.small import CNN1D
from kdx.module import DistillationModule
from kdx.teacher_outputs import TeacherOutputCache, topk_reconstruct

SHORT = [
    "debug=limit",
    "method=kd",
    "logger=csv",
    "callbacks.diagnostics.enabled=false",
    "print_summary=false",
]


class _Data(KDDataModule):
    num_classes, input_shape = 10, (1, 40)

    def __init__(self, n: int = 48):
        super().__init__(batch_size=16)
        generator = torch.Generator().manual_seed(3)
        self.train_set = tensor_dataset(torch.randn(n, 1, 40, generator=generator), torch.arange(n) % 10)


def _teacher() -> torch.nn.Module:
    from kdx.models.adapter import as_feature_model

    torch.manual_seed(0)
    return as_feature_model(CNN1D(10, (1, 40), channels=[8, 8, 8])).eval()


def test_exact_cache_equals_live_teacher_outputs(tmp_path):
    data, teacher = _Data(), _teacher()
    reads = frozenset({LOGITS, EMBEDDING, STAGES})
    cache = TeacherOutputCache("exact", tmp_path, {"teacher": "cnn1d"}, batch_size=7)  # 7: rows cross batches
    cache.prepare(teacher, reads, data)
    index = torch.tensor([5, 0, 47, 20])
    cached = cache.output(cache.read(index, epoch=3))
    x = torch.stack([data.train_set[i][0] for i in index.tolist()])
    with torch.no_grad():
        live = teacher(x, reads)
    torch.testing.assert_close(cached.logits, live.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached.embedding, live.embedding, atol=1e-5, rtol=0)
    assert len(cached.stages) == len(live.stages) == 3
    for a, b in zip(cached.stages, live.stages):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # a second run with the same key reuses the files (no teacher forward at all)
    again = TeacherOutputCache("exact", tmp_path, {"teacher": "cnn1d"})
    forwards = []
    hook = teacher.register_forward_hook(lambda *a: forwards.append(1))
    again.prepare(teacher, reads, data)
    hook.remove()
    assert forwards == [] and again.path == cache.path


class RandomViews(Dataset):
    """A training set whose item differs on every read (random augmentation, as far as a cache can tell)."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.randn(1, 40), 0, i


def test_exact_cache_refuses_random_training_views(tmp_path):
    data = _Data()
    data.train_set = RandomViews()
    with pytest.raises(KDXError, match="deterministic training view"):
        TeacherOutputCache("exact", tmp_path, {}).prepare(_teacher(), frozenset({LOGITS}), data)


@pytest.mark.parametrize(("name", "why"), [("backward", "input"), ("prokt", "trains the teacher")])
def test_methods_that_need_the_live_teacher_refuse_the_cache(tmp_path, name, why):
    cache = TeacherOutputCache("exact", tmp_path, {})
    with pytest.raises(KDXError, match=f"method={name} cannot train from cached teacher outputs: .*{why}"):
        DistillationModule(
            student=CNN1D(10, (1, 40), channels=[4, 4, 4]),
            teacher=CNN1D(10, (1, 40), channels=[4, 4, 4]),
            method=METHODS[name](),
            num_classes=10,
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
            teacher_cache=cache,
        )


def test_mnist1d_kd_same_accuracy_with_and_without_cache_and_no_teacher_forward_in_steps(
    tmp_path, cache_dir, monkeypatch
):
    plain = run_train(SHORT, tmp_path / "off", cache_dir)
    # count teacher forwards (the CNN1D teacher; the student is an MLP) inside training steps
    in_step, forwards = [False], []
    step = DistillationModule.training_step

    def counting_step(self, batch, batch_idx):
        in_step[0] = True
        try:
            return step(self, batch, batch_idx)
        finally:
            in_step[0] = False

    features = CNN1D.forward_features
    monkeypatch.setattr(DistillationModule, "training_step", counting_step)
    monkeypatch.setattr(
        CNN1D,
        "forward_features",
        lambda self, *a, **k: (forwards.append(in_step[0]), features(self, *a, **k))[1],
    )
    cached = run_train([*SHORT, "teacher.cache=exact"], tmp_path / "exact", cache_dir)
    assert cached["student/acc"] == plain["student/acc"]
    assert forwards and not any(
        forwards
    )  # the teacher ran in the pre-pass and in validation, never in a step
    a = torch.load(tmp_path / "off/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "exact/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for key in [k for k in a if k.startswith("student.")]:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)
    assert list((cache_dir / "teacher_outputs").glob("cnn1d-*/logits.npy"))


def test_cache_mode_is_validated(tmp_path):
    with pytest.raises(KDXError, match="teacher.cache='sometimes' is not one of off, exact, views, auto"):
        TeacherOutputCache("sometimes", tmp_path, {})
    cfg = compose_train([*SHORT, "teacher.cache=exact"], tmp_path, tmp_path)
    assert cfg.teacher.cache == "exact" and cfg.teacher.cache_views == 4


# -- views ---------------------------------------------------------------------------------------


class _Images(Dataset):
    """Eight random 3×32×32 uint8 images: the raw items a CIFAR training split holds."""

    def __init__(self):
        generator = torch.Generator().manual_seed(1)
        self.images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=generator)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.images[i], i % 10


class _Augmented(KDDataModule):
    num_classes, input_shape = 10, (3, 32, 32)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

    def __init__(self):
        super().__init__(batch_size=4)
        self.raw = _Images()
        self.train_set = IndexedDataset(self.raw)

    def replayable_views(self):
        return self.raw, list(range(8)), CropFlipReplay(32, 4, self.mean, self.std)


def test_view_replay_is_bit_identical_and_is_crop_then_flip():
    replay = CropFlipReplay(32, 4, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    image = _Images()[5][0]
    params = replay.params(seed=7, index=5, view=2)
    assert params == CropFlipReplay(32, 4, (0.5,) * 3, (0.2,) * 3).params(7, 5, 2)  # a fresh object agrees
    first, second = replay(image, params), replay(image, replay.params(7, 5, 2))
    assert torch.equal(first, second)
    # by hand: zero-pad by 4, take the 32×32 window at (top, left), mirror if flip, scale, normalise
    top, left, flip = params
    padded = torch.zeros(3, 40, 40)
    padded[:, 4:36, 4:36] = image.float() / 255
    window = padded[:, top : top + 32, left : left + 32]
    window = window.flip(-1) if flip else window
    expected = (window - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(
        3, 1, 1
    )
    torch.testing.assert_close(first, expected, atol=1e-6, rtol=0)
    # the draws cover the crop offsets and both flips across views
    drawn = {replay.params(7, i, v) for i in range(8) for v in range(16)}
    assert {p[2] for p in drawn} == {False, True} and len({p[:2] for p in drawn}) > 30


def test_view_cache_equals_live_teacher_on_the_replayed_views(tmp_path):
    from kdx.models.adapter import as_feature_model
    from kdx.models.cifar.resnet import resnet8

    torch.manual_seed(0)
    teacher = as_feature_model(resnet8(num_classes=10)).eval()
    data = _Augmented()
    cache = TeacherOutputCache("views", tmp_path, {"teacher": "resnet8"}, seed=11, views=3, topk=None)
    cache.prepare(teacher, frozenset({LOGITS}), data)
    replayed = ViewReplayDataset(data.raw, range(8), data.replayable_views()[2], views=3, seed=11)
    index, epoch = torch.tensor([6, 1, 3]), 5
    views = view_of(11, epoch, index.numpy(), 3)
    x = torch.stack([replayed.item(i, int(v))[0] for i, v in zip(index.tolist(), views)])
    with torch.no_grad():
        live = teacher(x, (LOGITS,)).logits
    torch.testing.assert_close(cache.output(cache.read(index, epoch)).logits, live, atol=1e-5, rtol=0)
    # the training loader now replays those views: in each epoch, each example once, as view_of's view
    loader = data.train_dataloader()
    loader.sampler.set_epoch(epoch)
    keys = list(loader.sampler)
    assert sorted(k // 3 for k in keys) == list(range(8))
    assert all(k % 3 == int(view_of(11, epoch, k // 3, 3)) for k in keys)
    x_loader, _, idx = next(iter(loader))
    for row, i in enumerate(idx.tolist()):
        assert torch.equal(x_loader[row], replayed.item(i, int(view_of(11, epoch, i, 3)))[0])


def test_view_sampler_order_follows_seed_and_epoch():
    a, b = ViewSampler(10, 4, seed=1, order_seed=2), ViewSampler(10, 4, seed=1, order_seed=2)
    a.set_epoch(3), b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)


def test_topk_reconstruction_keeps_topk_probabilities():
    # logits (2, 1, 0, 0), k = 2: the two kept classes keep softmax mass e²/Z and e/Z with
    # Z = e² + e + 2; the rest, 2/Z, is spread evenly over the two others: 1/Z each, exactly the
    # original softmax of a 0 logit, so the reconstruction is exact here (KL = 0).
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    values, indices = logits.topk(2, dim=1)
    approx = topk_reconstruct(values, indices, torch.logsumexp(logits, 1), 4)
    z = math.e**2 + math.e + 2
    torch.testing.assert_close(approx.softmax(1), torch.tensor([[math.e**2 / z, math.e / z, 1 / z, 1 / z]]))


def test_topk_views_cache_reports_its_error(tmp_path):
    from kdx.models.adapter import as_feature_model
    from kdx.models.cifar.resnet import resnet8

    torch.manual_seed(0)
    teacher = as_feature_model(resnet8(num_classes=10)).eval()
    cache = TeacherOutputCache("views", tmp_path, {}, seed=0, views=2, topk=3)
    cache.prepare(teacher, frozenset({LOGITS}), _Augmented())
    assert cache.info["topk_kl_mean"] is not None and cache.info["topk_kl_mean"] >= 0
    out = cache.output(cache.read(torch.tensor([0, 4]), epoch=0))
    assert out.logits.shape == (2, 10) and np.isfinite(out.logits.numpy()).all()


def test_module_serves_cached_outputs_only_for_the_batch_input(tmp_path):
    data = _Data()
    module = DistillationModule(
        student=CNN1D(10, (1, 40), channels=[4, 4, 4]),
        teacher=_teacher().model,
        method=METHODS["kd"](),
        num_classes=10,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        teacher_cache=TeacherOutputCache("exact", tmp_path, {}),
    )
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    assert module.teacher_cache.path is not None and trainer.global_step == 3
    assert module.cached_teacher(torch.zeros(1, 1, 40)) is None  # another input: the live teacher


def test_a_views_run_trains_on_the_replayed_views_even_with_a_scheduler(tmp_path):
    """A scheduler's horizon builds the training loader before fit starts; it must be the replaying one."""
    from functools import partial

    from kdx.models.cifar.resnet import resnet8

    L.seed_everything(0, verbose=False)
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, batch[0].clone(), batch[2].clone()))

    data = _Augmented()
    module = DistillationModule(
        student=resnet8(num_classes=10),
        teacher=resnet8(num_classes=10),
        method=METHODS["kd"](),
        num_classes=10,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR),
        teacher_cache=TeacherOutputCache("views", tmp_path, {}, seed=5, views=2),
    )
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Record()],
    )
    trainer.fit(module, datamodule=data)
    replayed = ViewReplayDataset(data.raw, range(8), data.replayable_views()[2], views=2, seed=5)
    assert len(seen) == 4  # 2 epochs × 2 batches of 4
    for epoch, x, index in seen:
        for row, i in enumerate(index.tolist()):
            assert torch.equal(x[row], replayed.item(i, int(view_of(5, epoch, i, 2)))[0])


def test_auto_mode_picks_views_exact_or_off(tmp_path):
    views = TeacherOutputCache("auto", tmp_path, {}, views=3)
    augmented = _Augmented()
    augmented.augment = True  # what CIFAR's data module says when it augments
    views.bind(augmented)
    assert (views.mode, views.views) == ("views", 3)
    exact = TeacherOutputCache("auto", tmp_path, {}, views=3)
    exact.bind(_Data())
    assert (exact.mode, exact.views) == ("exact", 1)

    random_data = _Data()
    random_data.train_set = RandomViews()
    unreplayable = TeacherOutputCache("auto", tmp_path, {})
    unreplayable.bind(random_data)
    assert not unreplayable.active
    # and a method that needs the live teacher runs without the cache instead of failing
    module = DistillationModule(
        student=CNN1D(10, (1, 40), channels=[4, 4, 4]),
        teacher=CNN1D(10, (1, 40), channels=[4, 4, 4]),
        method=METHODS["backward"](),
        num_classes=10,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        teacher_cache=TeacherOutputCache("auto", tmp_path, {}),
    )
    assert module.teacher_cache is None
