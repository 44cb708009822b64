"""The CIFAR zoo is the CRD benchmark's: parameter counts, embedding widths and stage shapes.

The golden figures are the CRD benchmark's, measured on RepDistiller's own model definitions (written
out in docs/zoo.md), not our output; "resnet8x4" must mean the same network as in the papers.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from kdx.models.base import KDModel, count_parameters
from kdx.models.registry import NO_DOWNLOADS, create_model, list_models, timm_model, torchvision_model

_R = "16x32x32, 16x32x32, 32x16x16, 64x8x8"
_RX4 = "32x32x32, 64x32x32, 128x16x16, 256x8x8"
_W2 = "16x32x32, 32x32x32, 64x16x16, 128x8x8"
_VGG = "64x32x32, 128x16x16, 256x8x8, 512x4x4, 512x4x4"
_R18 = "64x32x32, 64x32x32, 128x16x16, 256x8x8, 512x4x4"

# name: (parameters with 100 classes, embedding width, stage maps C×H×W for a 32×32 input)
ZOO = {
    "resnet8": (83_892, 64, _R),
    "resnet14": (181_108, 64, _R),
    "resnet20": (278_324, 64, _R),
    "resnet32": (472_756, 64, _R),
    "resnet44": (667_188, 64, _R),
    "resnet56": (861_620, 64, _R),
    "resnet110": (1_736_564, 64, _R),
    "resnet8x4": (1_233_540, 256, _RX4),
    "resnet32x4": (7_433_860, 256, _RX4),
    "resnet50_cifar": (23_705_252, 2048, "64x32x32, 256x32x32, 512x16x16, 1024x8x8, 2048x4x4"),
    "wrn_16_1": (180_916, 64, _R),
    "wrn_16_2": (703_284, 128, _W2),
    "wrn_40_1": (569_780, 64, _R),
    "wrn_40_2": (2_255_156, 128, _W2),
    "vgg8": (3_965_028, 512, _VGG),
    "vgg11": (9_277_284, 512, _VGG),
    "vgg13": (9_462_180, 512, _VGG),
    "vgg16": (14_774_436, 512, _VGG),
    "vgg19": (20_086_692, 512, _VGG),
    "mobile_half": (812_836, 1280, "16x16x16, 12x16x16, 16x8x8, 48x4x4, 160x2x2"),
    "shufflenetv1": (949_258, 960, "24x32x32, 240x16x16, 480x8x8, 960x4x4"),
    "shufflenetv2": (1_355_528, 1024, "24x32x32, 116x16x16, 232x8x8, 464x4x4"),
    # Not in the CRD benchmark (KDA's networks, docs/zoo.md): torchvision's published counts
    # (11,689,512 and 21,797,672 with 1000 classes) minus the 7×7 stem (9,408) plus a 3×3 one
    # (1,728), with a 100-way head (51,300 instead of 513,000). test_cifar_stem_resnets_are_torchvisions checks the same independently.
    "resnet18_cifar": (11_220_132, 512, _R18),
    "resnet34_cifar": (21_328_292, 512, _R18),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batches: one thread is faster and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_registry_holds_exactly_the_zoo():
    assert set(list_models()) == set(ZOO)
    assert list_models("wrn_*") == ["wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_matches_reference(name):
    params, width, shapes = ZOO[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes=100).eval()
    assert isinstance(model, KDModel)
    assert count_parameters(model) == params
    assert model.embedding_dim == width and model.num_classes == 100
    assert isinstance(model.classifier, nn.Linear) and model.classifier.in_features == width

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model.extract(x, stages=True)
        logits = model(x)
        plain = model.extract(x)
    assert ["x".join(map(str, s.shape[1:])) for s in out.stages] == shapes.split(", ")
    assert all(s.shape[0] == 2 for s in out.stages)
    assert out.embedding.shape == (2, width) and out.logits.shape == (2, 100)
    torch.testing.assert_close(logits, out.logits)
    assert plain.stages == []  # stages only when asked
    torch.testing.assert_close(plain.embedding, out.embedding)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_computes_the_same_in_channels_last(name):
    """channels_last=auto trains conv models in channels_last on a CPU: every zoo model gives the same
    logits, embedding and stage maps in both layouts, and its stages stay usable by the methods."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        contiguous = model.extract(x, stages=True)
        model.to(memory_format=torch.channels_last)
        nhwc = model.extract(x.contiguous(memory_format=torch.channels_last), stages=True)
    pairs = [(nhwc.logits, contiguous.logits), (nhwc.embedding, contiguous.embedding)]
    for a, b in [*pairs, *zip(nhwc.stages, contiguous.stages, strict=True)]:
        # another summation order: equal to float32 rounding, relative to the map's own scale (random
        # deep nets in eval mode grow their activations with depth)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_num_classes_and_gradients_reach_every_stage():
    model = create_model("resnet8", num_classes=10)
    out = model.extract(torch.randn(2, 3, 32, 32), stages=True)
    assert out.logits.shape == (2, 10)
    sum(s.mean() for s in out.stages).backward()
    assert model.conv1.weight.grad is not None and model.layer3[0].conv1.weight.grad is not None


def test_cifar_stem_resnets_are_torchvisions():
    """resnet18/34_cifar = torchvision's ResNet with a 3×3/1 stem and no max-pool."""
    for ours, theirs in (("resnet18_cifar", "resnet18"), ("resnet34_cifar", "resnet34")):
        ref = torchvision.models.get_model(theirs, weights=None, num_classes=100)
        ref.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        ref.maxpool = nn.Identity()
        assert count_parameters(create_model(ours, num_classes=100)) == count_parameters(ref)


def test_state_dict_keys_follow_repdistiller():
    """Module names match RepDistiller's, so its published CIFAR-100 checkpoints load as they are."""
    expected = {
        "resnet8": ["conv1.weight", "layer2.0.downsample.0.weight", "layer3.0.bn2.running_var", "fc.bias"],
        "wrn_16_2": [
            "block1.layer.0.convShortcut.weight",
            "block3.layer.1.bn2.weight",
            "bn1.weight",
            "fc.weight",
        ],
        "vgg8": ["block0.0.weight", "block0.1.running_mean", "block4.1.bias", "classifier.weight"],
        "resnet50_cifar": ["layer1.0.shortcut.0.weight", "layer4.2.conv3.weight", "linear.weight"],
        "shufflenetv1": ["layer1.0.conv1.weight", "layer3.3.bn3.bias", "linear.weight"],
        "shufflenetv2": ["layer1.0.conv5.weight", "layer2.7.conv3.weight", "conv2.weight", "linear.bias"],
        "mobile_half": ["conv1.0.weight", "blocks.6.0.conv.7.running_mean", "conv2.1.weight"],
    }
    for name, keys in expected.items():
        state = create_model(name, num_classes=100).state_dict()
        assert set(keys) <= set(state), (name, set(keys) - set(state))


def test_unknown_name_suggests_close_ones():
    with pytest.raises(ValueError, match="resnet8x4"):
        create_model("resnet8x5", num_classes=100)


def test_foreign_factories_never_download():
    with pytest.raises(ValueError, match="no downloads in kdx"):
        timm_model("resnet18", num_classes=10, pretrained=True)
    with pytest.raises(ValueError, match="teacher.ckpt=<path>"):
        torchvision_model("resnet18", num_classes=10, weights="DEFAULT")
    assert NO_DOWNLOADS == "no downloads in kdx; pass teacher.ckpt=<path>"
    model = timm_model("test_resnet", num_classes=7, input_shape=(1, 32, 32))
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)  # in_chans follows input_shape
    with pytest.raises(ValueError, match="unknown timm model"):
        timm_model("resnet18_typo_zz", num_classes=10)
