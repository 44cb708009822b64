"""Pre-activation stage features (``PREACT_STAGES``) against RepDistiller's ``preact=True``.

Each ``_ref_*`` function below is a separate, functional reading of RepDistiller's
``forward(x, is_feat=True, preact=...)`` for one family (models/resnet.py, resnetv2.py, wrn.py,
vgg.py, mobilenetv2.py, ShuffleNetv1.py, ShuffleNetv2.py). It calls only the leaf layers (conv,
BatchNorm, linear) of a second kdx model loaded with the first one's weights — never a kdx block's
``forward``, nor the new pre-activation path — and returns the post- and pre-activation stage lists
(RepDistiller's feature list without its last, pooled entry) and the logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdx.models import PREACT_STAGES, STAGES, NoPreactStagesError
from kdx.models.adapter import HookFeatureModel, as_feature_model
from kdx.models.base import EMBEDDING, LOGITS
from kdx.models.registry import create_model
from kdx.models.small import CNN1D, MLP

TOL = 1e-5


# --- independent re-implementation of RepDistiller's forward ------------------------------------


def _seq(layers: nn.Sequential, x: Tensor) -> Tensor:
    """A conv/BN/ReLU Sequential, ReLUs applied functionally (never in place)."""
    for layer in layers:
        x = F.relu(x) if isinstance(layer, nn.ReLU) else layer(x)
    return x


def _pool_fc(fc: nn.Linear, x: Tensor) -> Tensor:
    return fc(x.mean(dim=(2, 3)))


def _ref_resnet(m, x):
    """models/resnet.py and resnetv2.py: each stage's last block returns (relu(sum), sum)."""

    def block(b, x):
        if hasattr(b, "conv3"):  # resnetv2 Bottleneck
            out = F.relu(b.bn1(b.conv1(x)))
            out = F.relu(b.bn2(b.conv2(out)))
            out = b.bn3(b.conv3(out))
        else:
            out = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x)))))
        proj = getattr(b, "downsample", None) or getattr(b, "shortcut", None)
        res = x if proj is None or len(proj) == 0 else proj[1](proj[0](x))
        pre = out + res
        return F.relu(pre), pre

    x = F.relu(m.bn1(m.conv1(x)))
    post, pre = [x], [x]
    layers = [getattr(m, f"layer{i}") for i in range(1, 5) if hasattr(m, f"layer{i}")]
    for layer in layers:
        for b in layer:
            x, p = block(b, x)
        post.append(x)
        pre.append(p)
    return post, pre, _pool_fc(m.classifier, x)


def _ref_wrn(m, x):
    """models/wrn.py: raw stage outputs; preact = the next group's first bn1 (then the final bn1)."""

    def block(b, x):
        equal = b.convShortcut is None  # RepDistiller's equalInOut
        if equal:
            out = F.relu(b.bn1(x))
        else:
            x = F.relu(b.bn1(x))
            out = x
        out = F.relu(b.bn2(b.conv1(out)))
        out = b.conv2(out)
        return (x if equal else b.convShortcut(x)) + out

    out = m.conv1(x)
    post = [out]
    for group in (m.block1, m.block2, m.block3):
        for b in group.layer:
            out = block(b, out)
        post.append(out)
    logits = _pool_fc(m.fc, F.relu(m.bn1(out)))
    pre = [post[0], m.block2.layer[0].bn1(post[1]), m.block3.layer[0].bn1(post[2]), m.bn1(post[3])]
    return post, pre, logits


def _ref_vgg(m, x):
    """models/vgg.py: f0 after ReLU in both lists; f1..f4 before / after the block's ReLU."""
    h = x.shape[2]
    x = F.relu(_seq(m.block0, x))
    post, pre = [x], [x]
    x = F.max_pool2d(x, 2, 2)
    for i in range(1, 5):
        p = _seq(getattr(m, f"block{i}"), x)
        x = F.relu(p)
        pre.append(p)
        post.append(x)
        if i < 3 or (i == 3 and h == 64):
            x = F.max_pool2d(x, 2, 2)
    return post, pre, _pool_fc(m.classifier, x)


def _ref_mobilenetv2(m, x):
    """models/mobilenetv2.py: ignores ``preact`` — both lists are the same maps."""

    def block(b, x):
        stride1 = b.conv[3].stride == (1, 1)
        same = b.conv[0].in_channels == b.conv[6].out_channels
        out = _seq(b.conv, x)
        return x + out if stride1 and same else out

    out = _seq(m.conv1, x)
    feats = [out]
    for i, group in enumerate(m.blocks):
        for b in group:
            out = block(b, out)
        if i in (1, 2, 4, 6):
            feats.append(out)
    logits = _pool_fc(m.classifier, _seq(m.conv2, out))
    return feats, list(feats), logits


def _shuffle(x: Tensor, groups: int) -> Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def _ref_shufflenetv1(m, x):
    """models/ShuffleNetv1.py: each stage's last unit returns (relu(merge), merge)."""

    def unit(u, x):
        out = F.relu(u.bn1(u.conv1(x)))
        out = _shuffle(out, u.conv1.groups)
        out = F.relu(u.bn2(u.conv2(out)))
        out = u.bn3(u.conv3(out))
        if u.conv2.stride == (2, 2):
            pre = torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1)
        else:
            pre = out + x
        return F.relu(pre), pre

    x = F.relu(m.bn1(m.conv1(x)))
    post, pre = [x], [x]
    for layer in (m.layer1, m.layer2, m.layer3):
        for u in layer:
            x, p = unit(u, x)
        post.append(x)
        pre.append(p)
    return post, pre, _pool_fc(m.linear, x)


def _ref_shufflenetv2(m, x):
    """models/ShuffleNetv2.py: preact = cat(untouched half, branch before ReLU), not shuffled."""

    def down(u, x):
        left = F.relu(u.bn2(u.conv2(u.bn1(u.conv1(x)))))
        right = F.relu(u.bn3(u.conv3(x)))
        right = F.relu(u.bn5(u.conv5(u.bn4(u.conv4(right)))))
        out = _shuffle(torch.cat([left, right], 1), 2)
        return out, None

    def basic(u, x):
        c = int(x.size(1) * 0.5)
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(u.bn1(u.conv1(x2)))
        out = u.bn2(u.conv2(out))
        p = u.bn3(u.conv3(out))
        return _shuffle(torch.cat([x1, F.relu(p)], 1), 2), torch.cat([x1, p], 1)

    x = F.relu(m.bn1(m.conv1(x)))
    post, pre = [x], [x]
    for layer in (m.layer1, m.layer2, m.layer3):
        for u in layer:
            x, p = (down if hasattr(u, "conv5") else basic)(u, x)
        post.append(x)
        pre.append(p)
    logits = _pool_fc(m.linear, F.relu(m.bn2(m.conv2(x))))
    return post, pre, logits


# model name -> (reference, whether the family's stages end in an activation that preact removes)
CASES = {
    "resnet8": (_ref_resnet, True),
    "resnet32x4": (_ref_resnet, True),
    "resnet8x4": (_ref_resnet, True),
    "resnet110": (_ref_resnet, True),
    "wrn_40_2": (_ref_wrn, True),  # preact adds a BatchNorm rather than removing a ReLU
    "wrn_16_1": (_ref_wrn, True),
    "vgg13": (_ref_vgg, True),
    "vgg8": (_ref_vgg, True),
    "mobile_half": (_ref_mobilenetv2, False),
    "shufflenetv1": (_ref_shufflenetv1, True),
    "shufflenetv2": (_ref_shufflenetv2, True),
    "resnet50_cifar": (_ref_resnet, True),
    "resnet18_cifar": (_ref_resnet, True),
}


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Trained-like BatchNorms: random affine parameters, running statistics measured on a random
    batch (at init, eval-mode BN would be ~identity; arbitrary statistics would blow up deep nets)."""
    bns = [mod for mod in model.modules() if isinstance(mod, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.2)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one batch sets the statistics
        model.train()(torch.randn(16, 3, 32, 32, generator=gen))
        for bn in bns:
            bn.momentum = 0.1


def _pair(name: str):
    """kdx's model and a second instance loaded with its weights (for the reference)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    _randomise_bn(model, torch.Generator().manual_seed(1))
    ref = create_model(name, num_classes=10)
    ref.load_state_dict(model.state_dict())
    return model.eval(), ref.eval()


def _maxdiff(a: list[Tensor], b: list[Tensor]) -> float:
    assert len(a) == len(b)
    for s, t in zip(a, b):
        assert s.shape == t.shape
    return max((s - t).abs().max().item() for s, t in zip(a, b))


@pytest.mark.parametrize("name", list(CASES))
def test_preact_stages_match_repdistiller(name):
    reference, ends_in_activation = CASES[name]
    model, ref = _pair(name)
    size = 64 if name == "vgg8" else 32  # vgg8 at 64×64: RepDistiller's extra pool3 branch
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        post_ref, pre_ref, logits_ref = reference(ref, x)
        both = model.extract(x, stages=True, preact_stages=True)
        plain = model.extract(x, stages=True)
        only_pre = model.extract(x, preact_stages=True)

    d_pre = _maxdiff(both.preact_stages, pre_ref)
    d_post = _maxdiff(plain.stages, post_ref)
    print(f"{name}: max|Δ| preact {d_pre:.3g}, post {d_post:.3g}")
    assert d_pre <= TOL
    assert d_post <= TOL
    assert (plain.logits - logits_ref).abs().max().item() <= TOL
    # asking for preact changes nothing else, and costs nothing when not asked
    assert _maxdiff(both.stages, plain.stages) == 0
    assert _maxdiff(only_pre.preact_stages, both.preact_stages) == 0
    assert torch.equal(both.logits, plain.logits) and torch.equal(both.logits, model(x))
    assert plain.preact_stages == [] and only_pre.stages == []
    # stage 0 (the stem) is the same map in both lists; later stages differ where an activation ends them
    assert torch.equal(both.preact_stages[0], both.stages[0])
    for pre, post in zip(both.preact_stages[1:], both.stages[1:]):
        assert torch.equal(pre, post) != ends_in_activation


@pytest.mark.parametrize("name", list(CASES))
def test_preact_stages_train_mode(name):
    """Train mode: same features as the reference (batch statistics), gradients flow through
    every pre-activation map, and each BatchNorm's running statistics move exactly as in a
    plain forward (WRN's next-stage bn1 is applied once, not twice)."""
    reference, _ = CASES[name]
    model, ref = _pair(name)
    plain = copy.deepcopy(model)
    for m in (model, ref, plain):
        m.train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = model.extract(x, stages=True, preact_stages=True)
    with torch.no_grad():
        _, pre_ref, _ = reference(ref, x)
        plain.extract(x, stages=True)
    assert _maxdiff([p.detach() for p in out.preact_stages], pre_ref) <= TOL
    sum(p.square().mean() for p in out.preact_stages[1:]).backward()  # no in-place clash anywhere
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert stem.weight.grad is not None and torch.isfinite(stem.weight.grad).all()
    for (k, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), k


def test_plain_forward_never_runs_the_preact_path(monkeypatch):
    """No cost unless asked: logits and post-activation stages never call ``forward_preact``."""
    from kdx.models.cifar import resnet, shufflenetv1, shufflenetv2

    def boom(*_a, **_k):
        raise AssertionError("forward_preact called without a PREACT_STAGES read")

    for cls in (resnet.BasicBlock, shufflenetv1.ShuffleUnit, shufflenetv2.BasicUnit):
        monkeypatch.setattr(cls, "forward_preact", boom)
    x = torch.randn(2, 3, 32, 32)
    for name in ("resnet8", "shufflenetv1", "shufflenetv2"):
        model = create_model(name, num_classes=10).eval()
        with torch.no_grad():
            model(x)
            model.extract(x, stages=True)
            with pytest.raises(AssertionError, match="forward_preact called"):
                model.extract(x, preact_stages=True)


def test_adapter_passes_preact_through():
    model, _ = _pair("wrn_16_2")
    fm = as_feature_model(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = fm(x, {LOGITS, PREACT_STAGES})
        direct = model.extract(x, preact_stages=True)
        probe = fm.probe((3, 32, 32), (LOGITS, EMBEDDING, STAGES, PREACT_STAGES))
    assert out.stages == [] and _maxdiff(out.preact_stages, direct.preact_stages) == 0
    assert [tuple(p.shape[1:]) for p in probe.preact_stages] == [tuple(s.shape[1:]) for s in probe.stages]
    detached = out.detach()
    assert len(detached.preact_stages) == len(out.preact_stages)


@pytest.mark.parametrize(
    "model, name",
    [(MLP(10, (40,)), "MLP"), (CNN1D(10, (1, 40)), "CNN1D")],
)
def test_models_without_preact_definition_refuse(model, name):
    with pytest.raises(NoPreactStagesError, match=f"model {name} .*has no pre-activation"):
        model.extract(torch.randn(2, 1, 40), preact_stages=True)
    with pytest.raises(NoPreactStagesError, match=f"model {name} "):
        as_feature_model(model)(torch.randn(2, 1, 40), {LOGITS, PREACT_STAGES})


def test_hook_adapter_refuses_preact():
    net = nn.Sequential(nn.Flatten(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    fm = HookFeatureModel(net, stage_names=["2"])
    with pytest.raises(NoPreactStagesError, match="model Sequential \\(read through HookFeatureModel\\)"):
        fm(torch.randn(2, 8), {LOGITS, PREACT_STAGES})
    assert len(fm(torch.randn(2, 8), {LOGITS, STAGES}).stages) == 1
