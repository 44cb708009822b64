"""Data modules: (x, y, index) batches, declared shapes, caching, splits, and the on-disk formats.

CIFAR and ImageNet are exercised on tiny files these tests write in the real layouts; nothing is
downloaded.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdx.data.cifar import CIFAR10DataModule, CIFAR100DataModule, DatasetNotFoundError
from kdx.data.digits import DigitsDataModule
from kdx.data.imagenet import ImageNetDataModule
from kdx.data.mnist1d import MNIST1DDataModule
from kdx.data.synthetic import HierSyntheticDataModule, SyntheticDataModule

CONF = Path(__file__).resolve().parents[3] / "conf" / "dataset"


def check_batches(dm, augmented: bool = False) -> None:
    """Every loader yields (x, y, index) of the declared shape, and index points at the item."""
    loaders = {
        "train": dm.train_dataloader(),
        "train_eval": dm.train_eval_dataloader(),
        "val": dm.val_dataloader(),
        "test": dm.test_dataloader(),
    }
    for split, loader in loaders.items():
        x, y, index = next(iter(loader))
        assert tuple(x.shape[1:]) == tuple(dm.input_shape), split
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and index.dtype == torch.int64, split
        assert len(x) == len(y) == len(index) and len(set(index.tolist())) == len(index)
        assert 0 <= int(y.min()) and int(y.max()) < dm.num_classes
        for i, j in enumerate(index.tolist()):
            xj, yj, jj = loader.dataset[j]
            assert jj == j and int(yj) == int(y[i]), split
            if not (augmented and split == "train"):
                torch.testing.assert_close(torch.as_tensor(xj), x[i], msg=split)


def split_rows(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][0].flatten() for i in range(len(dataset))])


# ---------------------------------------------------------------- MNIST-1D


def test_mnist1d_generates_once_then_loads_the_cache(tmp_path, monkeypatch):
    np.random.seed(123)
    random.seed(123)
    np_state, py_state = np.random.get_state()[1].copy(), random.getstate()
    dm = MNIST1DDataModule(str(tmp_path), num_samples=500, val_fraction=0.1, batch_size=32)
    dm.prepare_data()
    dm.setup("fit")
    # generating must not reseed the run's global generators (make_dataset calls np.random.seed)
    assert (np.random.get_state()[1] == np_state).all() and random.getstate() == py_state
    [cache] = (tmp_path / "mnist1d").glob("mnist1d-*.pt")
    assert cache == dm.cache_path
    assert (dm.num_classes, dm.input_shape) == (10, (1, 40))
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (360, 40, 100)
    check_batches(dm)

    import mnist1d.data

    def no_generation(*args, **kwargs):
        raise AssertionError("regenerated although the cache exists")

    monkeypatch.setattr(mnist1d.data, "make_dataset", no_generation)
    again = MNIST1DDataModule(str(tmp_path), num_samples=500, val_fraction=0.1, batch_size=32)
    again.setup("fit")  # no prepare_data: setup alone must work
    for a, b in [(dm.train_set, again.train_set), (dm.val_set, again.val_set), (dm.test_set, again.test_set)]:
        assert torch.equal(split_rows(a), split_rows(b))  # same arrays, same (deterministic) split
    train, val, test = split_rows(dm.train_set), split_rows(dm.val_set), split_rows(dm.test_set)
    assert torch.cdist(val, train).min() > 0 and torch.cdist(test, train).min() > 0  # disjoint

    # a different generator setting is a different file
    assert MNIST1DDataModule(str(tmp_path), num_samples=500, seed=1).cache_path != dm.cache_path


def test_mnist1d_setup_generates_without_prepare_data(tmp_path):
    dm = MNIST1DDataModule(str(tmp_path), num_samples=200, val_fraction=0.2, batch_size=16)
    dm.setup("fit")
    assert dm.cache_path.is_file()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (128, 32, 40)


# ---------------------------------------------------------------- digits, synthetic


def test_digits_stratified_standardised_split():
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    sizes = len(dm.train_set), len(dm.val_set), len(dm.test_set)
    assert sum(sizes) == 1797 and abs(sizes[2] / 1797 - 0.2) < 0.01 and abs(sizes[1] / 1797 - 0.1) < 0.01
    check_batches(dm)
    train = dm.train_set.base.tensors
    assert abs(float(train[0].mean())) < 1e-4 and abs(float(train[0].std()) - 1) < 1e-4
    for split in (dm.train_set, dm.val_set, dm.test_set):
        assert set(split.base.tensors[1].tolist()) == set(range(10))  # stratified: every class everywhere
    other = DigitsDataModule()
    other.setup()
    assert torch.equal(other.test_set.base.tensors[0], dm.test_set.base.tensors[0])


@pytest.mark.parametrize("shape", [(32,), (3, 32, 32)])
def test_synthetic_shapes_determinism_and_learnability(shape):
    dm = SyntheticDataModule(
        input_shape=shape, num_classes=10, num_train=300, num_val=100, num_test=100, batch_size=50
    )
    dm.setup("fit")
    assert dm.input_shape == shape and (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (
        300,
        100,
        100,
    )
    check_batches(dm)
    other = SyntheticDataModule(
        input_shape=list(shape), num_classes=10, num_train=300, num_val=100, num_test=100
    )
    other.setup()
    assert torch.equal(split_rows(other.test_set), split_rows(dm.test_set))
    # nearest class mean, estimated on train, classifies test well: the task is learnable
    x, y = dm.train_set.base.tensors
    means = torch.stack([x[y == k].flatten(1).mean(0) for k in range(10)])
    xt, yt = dm.test_set.base.tensors
    assert (torch.cdist(xt.flatten(1), means).argmin(1) == yt).float().mean() > 0.9


def test_hier_synthetic_hierarchy_is_consistent():
    dm = HierSyntheticDataModule(
        num_super=4, sub_per_super=3, dim=16, num_train=600, num_val=120, num_test=120, batch_size=64
    )
    dm.setup("fit")
    assert dm.num_classes == 12 and dm.input_shape == (16,)
    assert dm.class_hierarchy.tolist() == [k // 3 for k in range(12)]
    check_batches(dm)
    sim = dm.true_class_similarity()
    same = dm.class_hierarchy[:, None] == dm.class_hierarchy[None, :]
    off_diag = ~torch.eye(12, dtype=torch.bool)
    assert torch.allclose(sim.diagonal(), torch.ones(12))
    assert sim[same & off_diag].min() > sim[~same].max()  # siblings are more alike than cousins
    # the data follows the declared means
    x, y = dm.train_set.base.tensors
    empirical = torch.stack([x[y == k].mean(0) for k in range(12)])
    assert (empirical - dm.class_means).norm(dim=1).max() < 0.6 * dm.class_means.norm(dim=1).min()
    assert dm.super_class_of(torch.tensor([0, 5, 11])).tolist() == [0, 1, 3]


# ---------------------------------------------------------------- CIFAR (tiny files, real format)


def _pickle(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)  # rows: R plane, G plane, B plane


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6) -> dict[str, np.ndarray]:
    rng, folder, data = np.random.default_rng(0), root / "cifar-10-batches-py", {}
    for b in range(1, 6):
        x, y = _images(rng, per_batch), rng.integers(0, 10, per_batch)
        data[f"data_batch_{b}"] = x
        _pickle(
            folder / f"data_batch_{b}",
            {
                "batch_label": f"training batch {b} of 5",
                "data": x,
                "labels": y.tolist(),
                "filenames": [f"{i}.png" for i in y],
            },
        )
    x, y = _images(rng, n_test), rng.integers(0, 10, n_test)
    data["test_batch"] = x
    _pickle(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "data": x,
            "labels": y.tolist(),
            "filenames": [f"{i}.png" for i in y],
        },
    )
    _pickle(
        folder / "batches.meta",
        {"label_names": [f"class{k}" for k in range(10)], "num_cases_per_batch": per_batch, "num_vis": 3072},
    )
    return data


def write_cifar100(root: Path, n_train: int = 20, n_test: int = 8) -> dict[str, np.ndarray]:
    rng, folder, data = np.random.default_rng(1), root / "cifar-100-python", {}
    for name, n in (("train", n_train), ("test", n_test)):
        x, fine = _images(rng, n), rng.integers(0, 100, n)
        data[name] = x
        _pickle(
            folder / name,
            {
                "filenames": [f"{i}.png" for i in range(n)],
                "batch_label": name,
                "fine_labels": fine.tolist(),
                "coarse_labels": (fine // 5).tolist(),
                "data": x,
            },
        )
    _pickle(
        folder / "meta",
        {
            "fine_label_names": [f"fine{k}" for k in range(100)],
            "coarse_label_names": [f"coarse{k}" for k in range(20)],
        },
    )
    return data


def trust_written_files(monkeypatch, cls, root: Path) -> None:
    """Point torchvision's md5 table at the files we wrote.

    torchvision verifies every CIFAR file against the md5 of the official release, which tiny test
    files cannot match. Rather than switching the check off, we give the class the checksums of our
    files, so torchvision's own integrity code still runs (and would catch a file we failed to write).
    """
    folder = root / cls.base_folder

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(cls, "train_list", [[n, md5(n)] for n, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[n, md5(n)] for n, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})


def test_cifar10_reads_the_torchvision_layout(tmp_path, monkeypatch):
    import torchvision.datasets

    data = write_cifar10(tmp_path)
    trust_written_files(monkeypatch, torchvision.datasets.CIFAR10, tmp_path)
    dm = CIFAR10DataModule(root=str(tmp_path), batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (20, 6, 6)
    assert dm.val_set is dm.test_set  # RepDistiller convention: validate on the test set
    check_batches(dm, augmented=True)
    # the first test image, normalised with CIFAR-10's statistics
    x0 = dm.test_set[0][0]
    raw = torch.as_tensor(data["test_batch"][0].reshape(3, 32, 32), dtype=torch.float32) / 255
    expected = (raw - torch.tensor(dm.mean)[:, None, None]) / torch.tensor(dm.std)[:, None, None]
    torch.testing.assert_close(x0, expected)


def test_cifar100_reads_the_torchvision_layout_and_can_hold_out_val(tmp_path, monkeypatch):
    import torchvision.datasets

    write_cifar100(tmp_path)
    trust_written_files(monkeypatch, torchvision.datasets.CIFAR100, tmp_path)
    dm = CIFAR100DataModule(root=str(tmp_path), batch_size=4)
    dm.setup("fit")
    assert dm.num_classes == 100 and (len(dm.train_set), len(dm.test_set)) == (20, 8)
    check_batches(dm, augmented=True)

    held = CIFAR100DataModule(root=str(tmp_path), val_fraction=0.25, seed=3, batch_size=4)
    held.setup("fit")
    assert (len(held.train_set), len(held.val_set), len(held.test_set)) == (15, 5, 8)
    train_idx, val_idx = set(held.train_set.base.indices), set(held.val_set.base.indices)
    assert not train_idx & val_idx and train_idx | val_idx == set(range(20))
    check_batches(held, augmented=True)


@pytest.mark.parametrize(
    "cls, folder", [(CIFAR10DataModule, "cifar-10-batches-py"), (CIFAR100DataModule, "cifar-100-python")]
)
def test_cifar_missing_files_is_one_clear_error(tmp_path, cls, folder):
    dm = cls(root=str(tmp_path / "nowhere"))
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError) as info:
            step()
        message = str(info.value)
        assert isinstance(info.value, DatasetNotFoundError) and "\n" not in message
        assert str(tmp_path / "nowhere" / folder) in message
        assert "dataset.datamodule.download=true" in message and f"{folder}/" in message
        assert info.value.__cause__ is None


def test_cifar_corrupt_files_are_one_clear_error(tmp_path):
    write_cifar100(tmp_path)  # present, but not the official checksums
    with pytest.raises(DatasetNotFoundError, match="checksum") as info:
        CIFAR100DataModule(root=str(tmp_path)).setup()
    assert "\n" not in str(info.value) and info.value.__suppress_context__


# ---------------------------------------------------------------- ImageNet (tiny ImageFolder)


def write_image_folder(root: Path, classes=("n01", "n02"), per_class=3) -> None:
    from PIL import Image

    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{c}_{i}.png")


def test_imagenet_image_folder(tmp_path):
    write_image_folder(tmp_path)
    dm = ImageNetDataModule(root=str(tmp_path), num_classes=2, image_size=32, resize_size=36, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.input_shape == (3, 32, 32) and len(dm.train_set) == 6 and dm.test_set is dm.val_set
    check_batches(dm, augmented=True)

    wrong = ImageNetDataModule(root=str(tmp_path), num_classes=1000)
    with pytest.raises(ValueError, match="num_classes=1000"):
        wrong.setup()


def test_imagenet_missing_folder_is_one_clear_error(tmp_path):
    (tmp_path / "train").mkdir()  # no class folders, no val/
    for step in ("setup", "prepare_data"):
        with pytest.raises(DatasetNotFoundError) as info:
            getattr(ImageNetDataModule(root=str(tmp_path)), step)()
        assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_dataset_config_matches_its_data_module(path, tmp_path):
    from hydra.utils import instantiate

    cfg = OmegaConf.create(
        {
            "dataset": OmegaConf.load(path),
            "paths": {"data_dir": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache")},
            # text data sets tokenise with the student's tokenizer (a folder read only in setup)
            "student": {"model": {"tokenizer": str(tmp_path / "tokenizer")}},
        }
    )
    dm = instantiate(cfg.dataset.datamodule)  # building one touches no file
    # the module's class is named like its config file; an instance may carry a longer name
    # (glue_<task>, lm_<corpus>) that starts with it
    assert path.stem in (dm.name, type(dm).name) and str(cfg.dataset.name).startswith(path.stem)
    assert cfg.dataset.num_classes == dm.num_classes
    if dm.input_shape is None:  # language modelling: blocks of token ids, no fixed input shape
        assert cfg.dataset.input_shape is None
    else:
        assert tuple(cfg.dataset.input_shape) == tuple(dm.input_shape)
    assert not any(tmp_path.iterdir())


def test_package_exports_are_lazy():
    import kdx.data

    assert kdx.data.CIFAR100DataModule is CIFAR100DataModule
    with pytest.raises(AttributeError):
        kdx.data.NoSuchModule  # noqa: B018


# ---------------------------------------------------------------- the data protocol


def _construct(tmp_path: Path) -> dict:
    """One instance of every data module class kdx ships, built without touching any file."""
    from kdx.data.glue import GLUEDataModule
    from kdx.data.lm import LMDataModule
    from kdx.data.synthetic_text import SyntheticTextDataModule

    return {
        MNIST1DDataModule: lambda: MNIST1DDataModule(str(tmp_path)),
        DigitsDataModule: DigitsDataModule,
        SyntheticDataModule: SyntheticDataModule,
        HierSyntheticDataModule: HierSyntheticDataModule,
        CIFAR10DataModule: lambda: CIFAR10DataModule(str(tmp_path)),
        CIFAR100DataModule: lambda: CIFAR100DataModule(str(tmp_path)),
        ImageNetDataModule: lambda: ImageNetDataModule(str(tmp_path)),
        GLUEDataModule: lambda: GLUEDataModule("sst2", str(tmp_path), str(tmp_path), "tokenizer"),
        SyntheticTextDataModule: lambda: SyntheticTextDataModule(str(tmp_path)),
        LMDataModule: lambda: LMDataModule(str(tmp_path)),
    }


def _data_module_classes() -> set[type]:
    """Every public data module class defined in kdx.data's modules (bases without ``setup`` excluded)."""
    import importlib
    import inspect
    import pkgutil

    import kdx.data
    from kdx.data.base import KDDataModule

    found = set()
    for info in pkgutil.iter_modules(kdx.data.__path__):
        module = importlib.import_module(f"kdx.data.{info.name}")
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, KDDataModule)
                and obj.__module__ == module.__name__
                and not name.startswith("_")
                and obj.setup is not KDDataModule.setup
            ):
                found.add(obj)
    return found


def test_every_data_module_class_is_covered_by_the_protocol_test(tmp_path):
    assert _data_module_classes() == set(_construct(tmp_path))


@pytest.mark.parametrize(
    "cls",
    sorted(_data_module_classes(), key=lambda c: c.__name__),
    ids=lambda c: c.__name__,
)
def test_data_module_declares_the_protocol(cls, tmp_path):
    from kdx.data.base import KDDataModule
    from kdx.data.text import TextDataModule

    declared = set(KDDataModule.__annotations__) | set(vars(KDDataModule))
    protocol = {
        "num_classes", "input_shape", "name", "augment", "drop_last", "batch_size", "eval_batch_size",
        "num_workers", "pin_memory", "collate_fn", "train_set", "val_set", "test_set", "replayed_views",
        "train_dataloader", "val_dataloader", "test_dataloader", "train_eval_dataloader", "dataloader",
        "train_targets", "replayable_views", "train_on_views", "true_class_similarity",
    }  # fmt: skip
    assert protocol <= declared
    dm = _construct(tmp_path)[cls]()
    assert isinstance(dm, KDDataModule)
    assert isinstance(dm.num_classes, int) and dm.num_classes >= 2
    assert dm.input_shape is None or (
        isinstance(dm.input_shape, tuple) and all(isinstance(s, int) and s > 0 for s in dm.input_shape)
    )
    assert isinstance(dm.name, str) and dm.name != KDDataModule.name  # each names itself
    assert isinstance(dm.augment, bool) and isinstance(dm.drop_last, bool)
    assert isinstance(dm.batch_size, int) and isinstance(dm.eval_batch_size, int)
    assert dm.train_set is dm.val_set is dm.test_set is dm.replayed_views is None  # built in setup
    # the training loader is the base's, so train_on_views reaches every data module
    assert cls.train_dataloader is KDDataModule.train_dataloader
    assert cls.dataloader is KDDataModule.dataloader and cls.train_on_views is KDDataModule.train_on_views
    with pytest.raises(ValueError, match="'valid' is not one of train, val, test, train_eval"):
        dm.dataloader("valid")
    if isinstance(dm, TextDataModule):
        assert dm.input_shape == (dm.max_length,) and dm.collate_fn is not None
        assert "" in dm.tokenizers and all(isinstance(v, str) for v in dm.tokenizers.values())
    assert not any(tmp_path.iterdir())


def _batches(loader) -> list:
    return [tuple(part.clone() for part in batch) for batch in loader]


@pytest.mark.parametrize("drop_last", [False, True])
def test_dataloader_of_a_split_is_that_splits_loader(drop_last):
    from kdx.data.base import SPLITS

    dm = SyntheticDataModule(num_train=50, num_val=20, num_test=30, batch_size=8, drop_last=drop_last)
    dm.setup("fit")
    named = {
        "train": dm.train_dataloader,
        "val": dm.val_dataloader,
        "test": dm.test_dataloader,
        "train_eval": dm.train_eval_dataloader,
    }
    assert set(SPLITS) == set(named)
    for split, make in named.items():
        mine, theirs = dm.dataloader(split), make()
        assert mine.dataset is theirs.dataset and mine.drop_last == theirs.drop_last, split
        if split == "train":
            mine.sampler.set_epoch(3), theirs.sampler.set_epoch(3)
        a, b = _batches(mine), _batches(theirs)
        assert len(a) == len(b) > 0, split
        for x, y in zip(a, b):
            assert all(torch.equal(p, q) for p, q in zip(x, y)), split
    assert len(_batches(dm.dataloader("train"))) == (6 if drop_last else 7)  # 50 = 6 × 8 + 2
    assert [int(i) for b in _batches(dm.dataloader("train_eval")) for i in b[2]] == list(range(50))


def _labels_through_the_items(dataset) -> list[int]:
    labels = []
    for i in range(len(dataset)):
        _, y, index = dataset[i]
        assert index == i
        labels.append(int(y))
    return labels


@pytest.mark.parametrize("name", ["synthetic", "hier_synthetic", "digits", "mnist1d", "cifar", "imagenet"])
def test_train_targets_are_the_training_labels_in_index_order(name, tmp_path, monkeypatch):
    import torchvision.datasets

    if name == "cifar":
        write_cifar10(tmp_path)
        trust_written_files(monkeypatch, torchvision.datasets.CIFAR10, tmp_path)
        dm = CIFAR10DataModule(str(tmp_path), val_fraction=0.25, seed=2)  # train: a shuffled subset
    elif name == "imagenet":
        write_image_folder(tmp_path)
        dm = ImageNetDataModule(str(tmp_path), num_classes=2, image_size=32, resize_size=36)
    else:
        dm = {
            "synthetic": lambda: SyntheticDataModule(num_train=60, num_classes=7),
            "hier_synthetic": lambda: HierSyntheticDataModule(num_train=60),
            "digits": DigitsDataModule,
            "mnist1d": lambda: MNIST1DDataModule(str(tmp_path), num_samples=200),
        }[name]()
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_targets()
    dm.setup("fit")
    expected = _labels_through_the_items(dm.train_set)
    targets = dm.train_targets()
    assert targets.dtype == torch.int64 and targets.tolist() == expected
    assert len(set(expected)) > 1
    if name in ("cifar", "imagenet"):  # read from the label arrays: no image is decoded
        inner = dm.train_set.base
        monkeypatch.setattr(type(inner), "__getitem__", lambda *a: pytest.fail("an image was decoded"))
        assert dm.train_targets().tolist() == expected


def test_cifar_trains_on_replayed_views_that_are_crops_and_flips_of_its_images(tmp_path, monkeypatch):
    import torchvision.datasets

    from kdx.data.replay import ViewReplayDataset, view_of

    write_cifar10(tmp_path)
    trust_written_files(monkeypatch, torchvision.datasets.CIFAR10, tmp_path)
    assert CIFAR10DataModule(str(tmp_path), augment=False).replayable_views() is None  # nothing to replay
    dm = CIFAR10DataModule(str(tmp_path), val_fraction=0.25, seed=2, batch_size=4)
    dm.setup("fit")
    source = dm.replayable_views()
    assert source is not None and len(source.indices) == len(dm.train_set) == 15
    seed, views, epoch = 11, 3, 2
    dm.train_on_views(ViewReplayDataset(*source, views=views, seed=seed))
    loader = dm.dataloader("train")
    loader.sampler.set_epoch(epoch)
    plain = dm.train_eval_dataloader().dataset  # example i, normalised, not augmented
    # the padding is zeros before normalisation: (0 - mean) / std in the normalised image
    pad = (-torch.tensor(dm.mean) / torch.tensor(dm.std)).view(3, 1, 1)
    seen = []
    for x, y, index in loader:
        for row, i in enumerate(index.tolist()):
            view = int(view_of(seed, epoch, i, views))
            top, left, flip = source.replay.params(seed, i, view)
            padded = pad.expand(3, 40, 40).clone()
            padded[:, 4:36, 4:36] = plain[i][0]
            window = padded[:, top : top + 32, left : left + 32]
            torch.testing.assert_close(x[row], window.flip(-1) if flip else window, atol=1e-6, rtol=0)
            assert int(y[row]) == int(plain[i][1])
            seen.append(i)
    assert sorted(seen) == list(range(15))  # each example once per epoch
    # in the order of the plain training loader, and back to it with train_on_views(None)
    dm.train_on_views(None)
    augmented = dm.train_dataloader()
    augmented.sampler.set_epoch(epoch)
    assert augmented.dataset is dm.train_set and list(augmented.sampler) == seen
