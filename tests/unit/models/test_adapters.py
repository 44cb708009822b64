"""Every model, whatever its origin, gives the same record through ``as_feature_model``; only what
is read is computed; a wrong stage name is an error that lists the valid ones."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from kdx.models.adapter import (
    GraphFeatureModel,
    HookFeatureModel,
    NativeFeatureModel,
    TimmFeatureModel,
    as_feature_model,
)
from kdx.models.base import EMBEDDING, LOGITS, STAGES
from kdx.models.registry import create_model, timm_model, torchvision_model

ALL = (LOGITS, EMBEDDING, STAGES)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def shapes(out):
    return [tuple(s.shape[1:]) for s in out.stages]


class Tiny(nn.Module):
    """A user's own classifier; it notes how many hooks are on it while it runs."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU()
        )
        self.head = nn.Linear(16, 5)
        self.hooks_seen = -1

    def forward(self, x):
        self.hooks_seen = len(self.body[1]._forward_hooks) + len(self.head._forward_pre_hooks)
        return self.head(self.body(x).mean((2, 3)))


def test_zoo_model_is_native(x, monkeypatch):
    model = create_model("resnet8", num_classes=10).eval()
    fm = as_feature_model(model)
    assert isinstance(fm, NativeFeatureModel) and fm.num_classes == 10
    out = fm(x, ALL)
    assert shapes(out) == [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]
    assert out.embedding.shape == (2, 64)
    assert shapes(fm.probe((3, 32, 32))) == shapes(out)

    calls = []
    original = model.forward_features
    monkeypatch.setattr(
        model, "forward_features", lambda x, stages=False: calls.append(stages) or original(x, stages)
    )
    logits_only = fm(x)
    assert calls == [False] and logits_only.stages == [] and logits_only.embedding is None
    torch.testing.assert_close(logits_only.logits, out.logits)
    assert fm(x, {EMBEDDING}).stages == [] and calls[-1] is False


def test_zoo_model_with_module_paths_uses_hooks(x):
    model = create_model("resnet8x4", num_classes=10).eval()
    fm = as_feature_model(model, stage_names=["layer1", "layer3.0.conv2"])
    assert isinstance(fm, HookFeatureModel)
    out = fm(x, ALL)
    assert shapes(out) == [(64, 32, 32), (256, 8, 8)] and out.embedding.shape == (2, 256)


def test_timm_model(x, monkeypatch):
    model = timm_model("test_resnet", num_classes=10, input_shape=(3, 32, 32)).eval()
    fm = as_feature_model(model)
    assert isinstance(fm, TimmFeatureModel) and fm.num_classes == 10
    out = fm(x, ALL)
    assert shapes(out) == [(32, 16, 16), (32, 8, 8), (48, 4, 4), (192, 2, 2), (96, 1, 1)]
    assert out.embedding.shape == (2, model.num_features)
    torch.testing.assert_close(out.logits, model(x))

    def forbidden(*_a, **_k):
        raise AssertionError("computed stages that nobody read")

    monkeypatch.setattr(model, "forward_intermediates", forbidden)
    torch.testing.assert_close(fm(x).logits, out.logits)
    emb = fm(x, {EMBEDDING})
    assert emb.stages == [] and emb.embedding.shape == (2, model.num_features)


def test_torchvision_model_through_feature_extraction(x):
    model = torchvision_model("resnet18", num_classes=10)
    fm = as_feature_model(model, stage_names=["layer1", "layer2", "layer3", "layer4"])
    assert isinstance(fm, GraphFeatureModel) and fm.num_classes == 10
    for mode in (True, False):  # the graph follows train / eval (BatchNorm batch vs running stats)
        fm.train(mode)
        out = fm(x, ALL)
        assert shapes(out) == [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]
        assert out.embedding.shape == (2, 512)
        with torch.no_grad():
            torch.testing.assert_close(out.logits, model(x))
    # the graph shares the model's weights and adds nothing to the state dict
    assert set(fm.state_dict()) == {f"model.{k}" for k in model.state_dict()}
    out.stages[0].sum().backward()
    assert model.layer1[0].conv1.weight.grad is not None
    # graph nodes work as well as module paths
    nodes = as_feature_model(model, stage_names=["layer1.0.add", "flatten"])
    assert shapes(nodes(x, {STAGES})) == [(64, 8, 8), (512,)]


def test_torchvision_copies_and_pickles(x):
    fm = as_feature_model(torchvision_model("resnet18", num_classes=10), stage_names=["layer2"]).eval()
    ref = fm(x, ALL)
    for clone in (copy.deepcopy(fm), pickle.loads(pickle.dumps(fm))):
        out = clone(x, ALL)
        torch.testing.assert_close(out.stages[0], ref.stages[0])
        torch.testing.assert_close(out.logits, ref.logits)
        assert clone._extractor().get_submodule("layer2.0.conv1") is clone.model.layer2[0].conv1  # its own


def test_torchvision_logits_only_builds_nothing(x):
    model = torchvision_model("resnet18", num_classes=10)
    fm = as_feature_model(model, stage_names=["layer4"])
    seen = []
    model.fc.register_forward_hook(lambda m, *_: seen.append(len(m._forward_pre_hooks)))
    assert fm(x).stages == []
    assert "_graph" not in fm.__dict__ and seen == [0]  # no graph, no embedding hook
    fm(x, {EMBEDDING})
    assert "_graph" not in fm.__dict__ and seen[-1] == 1


def test_untraceable_torchvision_model_falls_back_to_hooks(x, monkeypatch):
    import torchvision.models.feature_extraction as fx

    def cannot_trace(*_a, **_k):
        raise RuntimeError("symbolically traced variables cannot be used as inputs to control flow")

    monkeypatch.setattr(fx, "get_graph_node_names", cannot_trace)
    with pytest.warns(UserWarning, match="cannot be traced"):
        fm = as_feature_model(torchvision_model("resnet18", num_classes=10), stage_names=["layer3"])
    assert type(fm) is HookFeatureModel
    assert shapes(fm(x, {STAGES})) == [(256, 2, 2)]


def test_custom_module_with_module_paths(x):
    model = Tiny()
    fm = as_feature_model(model, stage_names=["body.1", "body.3"])
    assert isinstance(fm, HookFeatureModel) and fm.classifier is model.head and fm.num_classes == 5
    out = fm(x, ALL)
    assert shapes(out) == [(8, 32, 32), (16, 16, 16)] and out.embedding.shape == (2, 16)
    assert model.hooks_seen == 2
    torch.testing.assert_close(out.embedding, model.body(x).mean((2, 3)))

    only = fm(x)
    assert model.hooks_seen == 0 and only.stages == [] and only.embedding is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    "make, valid",
    [
        (lambda: Tiny(), "body.1"),
        (lambda: create_model("resnet8", num_classes=10), "layer1.0.conv1"),
        (lambda: torchvision_model("resnet18", num_classes=10), "layer1.0.add"),
    ],
)
def test_bad_stage_name_lists_available(make, valid):
    with pytest.raises(ValueError, match="'layer9' does not exist") as err:
        as_feature_model(make(), stage_names=["layer9"])
    assert valid in str(err.value)


def test_bad_classifier_name_is_a_clear_error():
    with pytest.raises(ValueError, match="classifier module path 'fc' does not exist.*available: body"):
        as_feature_model(Tiny(), classifier_name="fc")
