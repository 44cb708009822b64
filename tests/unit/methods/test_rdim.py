"""RdimKD: projection identities (docs/methods.md §4), connectors, fitting, gradient flow, e2e."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from sklearn.decomposition import PCA
from torch.utils.data import DataLoader

from conftest import FAST, SMALL_CIFAR, run_train
from kdx.context import StepContext
from kdx.data.base import tensor_dataset
from kdx.data.synthetic import SyntheticDataModule
from kdx.methods.connectors import Connector, to_tokens
from kdx.methods.rdim import (
    RdimKD,
    StreamingMoments,
    fit_autoencoder,
    pca_directions,
    random_orthogonal,
    rdim_loss,
)
from kdx.models.adapter import as_feature_model
from kdx.models.small import CNN1D

# ---------------------------------------------------------------------------------------------
# Projection identities.


def test_random_projection_is_orthonormal_and_seeded():
    k = random_orthogonal(32, 8, seed=3)
    assert k.shape == (32, 8)
    torch.testing.assert_close(k.t() @ k, torch.eye(8), atol=1e-6, rtol=0)
    assert torch.equal(k, random_orthogonal(32, 8, seed=3))
    assert not torch.allclose(k, random_orthogonal(32, 8, seed=4))
    with pytest.raises(ValueError):
        random_orthogonal(4, 5)


def test_loss_is_zero_when_adapted_student_equals_teacher():
    x_t = torch.randn(20, 16)
    assert rdim_loss(x_t.clone(), x_t, random_orthogonal(16, 4)).item() == 0.0


def test_loss_ignores_the_null_space_of_the_projection():
    torch.manual_seed(0)
    k = random_orthogonal(16, 4, seed=1)
    x_s, x_t = torch.randn(20, 16), torch.randn(20, 16)
    noise = torch.randn(20, 16)
    perp = noise - (noise @ k) @ k.t()  # rows in null(Kᵀ): the complement of span(K)
    assert perp.norm() > 1.0
    torch.testing.assert_close(rdim_loss(x_s + perp, x_t, k), rdim_loss(x_s, x_t, k))
    torch.testing.assert_close(rdim_loss(x_t + perp, x_t, k), torch.tensor(0.0), atol=1e-10, rtol=0)


def test_expectation_over_random_projections():
    # E_K ‖δK‖²_F = (d / C_t)·‖δ‖²_F for Haar K; with kdx's mean reduction over (N, d) that is
    # E_K L = ‖δ‖²_F / (N·C_t): plain MSE over all C_t channels.
    torch.manual_seed(0)
    n, c, d = 12, 24, 6
    delta = torch.randn(n, c)
    sums, means = [], []
    for seed in range(2000):
        k = random_orthogonal(c, d, seed=seed)
        sums.append((delta @ k).pow(2).sum())
        means.append(rdim_loss(delta, torch.zeros(n, c), k))
    full = delta.pow(2).sum()
    assert torch.stack(sums).mean().item() == pytest.approx((d / c) * full.item(), rel=0.05)
    assert torch.stack(means).mean().item() == pytest.approx(delta.pow(2).mean().item(), rel=0.05)


def _anisotropic(n=600, c=12, seed=0, scales=None):
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(3.0, 0.2, c, dtype=torch.float64) if scales is None else scales
    rotation, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
    return (torch.randn(n, c, generator=g, dtype=torch.float64) * scales) @ rotation.t() + 5.0


def test_pca_directions_match_scikit_learn_up_to_sign():
    x = _anisotropic()
    moments = StreamingMoments()
    for chunk in x.split(64):
        moments.update(chunk)
    torch.testing.assert_close(moments.mean(), x.mean(0))
    torch.testing.assert_close(moments.covariance(), torch.cov(x.t()))
    k = pca_directions(moments.covariance(), 4)
    torch.testing.assert_close(k.t() @ k, torch.eye(4), atol=1e-6, rtol=0)
    components = torch.from_numpy(PCA(n_components=4, svd_solver="full").fit(x.numpy()).components_)
    for i in range(4):
        sign = torch.sign(components[i] @ k[:, i].double())
        torch.testing.assert_close(k[:, i].double() * sign, components[i], atol=1e-5, rtol=0)


def test_linear_autoencoder_approaches_the_principal_subspace():
    # A 2-D subspace of this data picked at random keeps ~26% of the variance the top-2 PCA subspace
    # keeps; 200 Adam steps of the AE get most of the way there (it converges to PCA's subspace).
    scales = torch.tensor([3.0, 2.5, 0.4, 0.3, 0.3, 0.2, 0.2, 0.1], dtype=torch.float64)
    x = _anisotropic(n=1024, c=8, scales=scales).float()
    x = x - x.mean(0)
    encoder = fit_autoencoder(x, dim=2, epochs=25, lr=3e-2, batch_size=128, seed=0)
    assert not any(p.requires_grad for p in encoder.parameters())
    basis, _ = torch.linalg.qr(encoder[0].weight.detach().t())  # (C, d), orthonormal
    pca = pca_directions(torch.cov(x.t()), 2)
    captured = (x @ basis).pow(2).sum() / (x @ pca).pow(2).sum()
    assert 0.8 < captured <= 1.0 + 1e-6


# ---------------------------------------------------------------------------------------------
# Connectors.


@pytest.mark.parametrize(
    "s_shape,t_shape,out_shape,kind",
    [
        ((8, 16, 16), (32, 8, 8), (32, 8, 8), torch.nn.Conv2d),  # student map larger: pool, 1×1 conv
        ((8, 4, 4), (32, 8, 8), (32, 8, 8), torch.nn.Conv2d),  # smaller: 1×1 conv, interpolate
        ((16, 10), (32, 5), (32, 5), torch.nn.Conv1d),  # 1-D stage maps
        ((32, 8, 8), (32, 8, 8), (32, 8, 8), torch.nn.Identity),  # equal widths: identity
        ((100,), (64,), (64,), torch.nn.Linear),  # embeddings
        ((100,), (64, 10), (64,), torch.nn.Linear),  # vector vs map: pool both
    ],
)
def test_connector_maps_student_to_teacher_layout(s_shape, t_shape, out_shape, kind):
    conn = Connector(s_shape, t_shape)
    assert isinstance(conn.proj, kind) and conn.output_shape == out_shape
    s, t = torch.randn(3, *s_shape), torch.randn(3, *t_shape)
    assert conn(s).shape == (3, *out_shape) == conn.teacher(t).shape
    assert to_tokens(conn(s)).shape == (3 * math.prod(out_shape[1:]), out_shape[0])


def test_to_tokens_keeps_channels_together():
    x = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    tokens = to_tokens(x)
    assert tokens.shape == (40, 3)
    torch.testing.assert_close(tokens[7], x[0, :, 1, 2])  # position (1, 2) of example 0


# ---------------------------------------------------------------------------------------------
# The method outside Lightning.


def _setup(projection="pca", **kwargs):
    torch.manual_seed(0)
    student = as_feature_model(CNN1D(4, (1, 24), channels=(4, 8, 8)))
    teacher = as_feature_model(CNN1D(4, (1, 24), channels=(8, 16, 32))).eval().requires_grad_(False)
    x, y = torch.randn(96, 1, 24), torch.randint(0, 4, (96,))
    loader = DataLoader(tensor_dataset(x, y), batch_size=32)
    method = RdimKD(projection=projection, **kwargs)
    method.setup(student, teacher, SyntheticDataModule(input_shape=(1, 24), num_classes=4))
    return method, student, teacher, loader


def test_setup_sizes_adapter_and_projection_by_probing():
    method, *_ = _setup(dim=None, dim_ratio=0.25)
    assert isinstance(method.parts[0].connector.proj, torch.nn.Conv1d)  # last stages: (8, 6) -> (32, 6)
    assert (method.parts[0].connector.in_channels, method.parts[0].connector.out_channels) == (8, 32)
    assert method.parts[0].projection_matrix.shape == (32, 8) and not all(
        bool(part.fitted) for part in method.parts
    )
    with pytest.raises(ValueError, match="exceeds"):
        _setup(dim=64)
    with pytest.raises(ValueError, match="method.projection"):
        RdimKD(projection="svd")


def test_pca_fit_on_teacher_stage_tokens_matches_scikit_learn():
    method, _, teacher, loader = _setup("pca", dim=5)
    teacher.train()  # the fit must put the teacher in eval and leave its BN statistics alone
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method.fit(teacher, loader)
    assert teacher.training and all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    teacher.eval()
    with torch.no_grad():
        tokens = torch.cat([to_tokens(teacher(x, method.reads).stages[-1]) for x, _, _ in loader]).double()
    components = torch.from_numpy(PCA(n_components=5, svd_solver="full").fit(tokens.numpy()).components_)
    k = method.parts[0].projection_matrix.double()
    torch.testing.assert_close((components @ k).abs(), torch.eye(5, dtype=torch.float64), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "projection,kwargs",
    [
        ("random", {}),
        ("pca", {}),
        ("ae", {"ae_epochs": 2}),
        ("ae", {"ae_epochs": 2, "ae_hidden": 16}),
        ("random", {"standardize": True}),
    ],
)
def test_gradient_flow_student_and_adapter(projection, kwargs):
    method, student, teacher, loader = _setup(projection, **kwargs)
    method.fit(teacher, loader)
    assert all(bool(part.fitted) for part in method.parts)
    if not method.nonlinear:
        k = method.parts[0].projection_matrix
        torch.testing.assert_close(k.t() @ k, torch.eye(k.shape[1]), atol=1e-5, rtol=0)
    params = [*student.parameters(), *method.parameters()]
    assert len(list(method.parameters())) == 2  # the 1×1 conv adapter's weight and bias
    optimizer = torch.optim.SGD(params, lr=0.1)
    x, y, index = next(iter(loader))
    ctx = StepContext(student=student, teacher=teacher)
    terms = method.training_step((x, y, index), ctx)
    assert set(terms) == {"loss", "ce", "rdim"} and terms["rdim"].item() > 0
    terms["rdim"].backward(retain_graph=True)  # the feature term alone reaches the adapter and the stages
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert all(p.grad is not None for n, p in student.named_parameters() if "classifier" not in n)
    terms["loss"].backward()
    optimizer.step()


def test_loss_uses_the_fitted_projection_and_weights():
    method, student, teacher, loader = _setup("pca", dim=4, weight=2.5, kd_weight=0.5)
    method.fit(teacher, loader)
    x, y, index = next(iter(loader))
    terms = method.training_step((x, y, index), StepContext(student=student, teacher=teacher))
    s_tok = to_tokens(method.parts[0].connector(student(x, method.reads).stages[-1]))
    t_tok = to_tokens(teacher(x, method.reads).stages[-1])
    expected = ((s_tok - t_tok) @ method.parts[0].projection_matrix).pow(2).mean()
    torch.testing.assert_close(terms["rdim"], 2.5 * expected)  # the weighted term the loss adds
    torch.testing.assert_close(terms["loss"], terms["ce"] + 2.5 * expected + 0.5 * terms["kd"])


@pytest.mark.parametrize("feature", ["stage", "embedding"])
@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize(
    "projection,kwargs",
    [("random", {}), ("pca", {}), ("ae", {"ae_epochs": 1}), ("ae", {"ae_epochs": 1, "ae_hidden": 8})],
)
def test_a_student_equal_to_the_teacher_has_zero_loss_under_every_option(
    feature, standardize, projection, kwargs
):
    # Equal widths: the adapter is the identity, so A(X_s) = X_t token for token; the same
    # standardisation z (teacher statistics) and the same projection act on both sides, so
    # z(A(X_s))K − z(X_t)K = 0 exactly (and enc(·) − enc(·) = 0 for the non-linear AE).
    torch.manual_seed(0)
    teacher = as_feature_model(CNN1D(4, (1, 24), channels=(8, 16, 32))).eval().requires_grad_(False)
    student = as_feature_model(copy.deepcopy(teacher.model)).eval()
    x, y = torch.randn(64, 1, 24) * 3 + 1, torch.randint(0, 4, (64,))
    loader = DataLoader(tensor_dataset(x, y), batch_size=32)
    method = RdimKD(projection=projection, feature=feature, standardize=standardize, dim=4, **kwargs)
    method.setup(student, teacher, SyntheticDataModule(input_shape=(1, 24), num_classes=4))
    method.fit(teacher, loader)
    assert method.parts[0].connector.is_identity
    if standardize:  # the statistics are fitted and used: the zero is not an accident of μ = 0, σ = 1
        assert method.parts[0].teacher_mean.abs().max() > 1e-3
    terms = method.training_step(
        (x[:32], y[:32], torch.arange(32)), StepContext(student=student, teacher=teacher)
    )
    assert terms["rdim"].item() == 0.0


def test_several_stages_each_with_its_dim_and_weight():
    method, student, teacher, loader = _setup(
        "random",
        stages=[{"index": -2, "dim": 3, "weight": 0.5}, {"index": -1, "weight": 2.0}],
        dim_ratio=0.25,
    )
    method.fit(teacher, loader)
    # stage -2: teacher (16, 12) vs student (8, 12) -> d = 3; stage -1: teacher 32 channels -> d = 8
    assert [tuple(p.projection_matrix.shape) for p in method.parts] == [(16, 3), (32, 8)]
    assert not torch.equal(
        method.parts[0].projection_matrix[:3, :3], method.parts[1].projection_matrix[:3, :3]
    )
    x, y, index = next(iter(loader))
    terms = method.training_step((x, y, index), StepContext(student=student, teacher=teacher))
    s_out, t_out = student(x, method.reads), teacher(x, method.reads)
    expected = [
        (
            (to_tokens(p.connector(s_out.stages[p.index])) - to_tokens(t_out.stages[p.index]))
            @ p.projection_matrix
        )
        .pow(2)
        .mean()
        for p in method.parts
    ]
    torch.testing.assert_close(terms["rdim/-2"], expected[0].detach())
    torch.testing.assert_close(terms["rdim"], 0.5 * expected[0] + 2.0 * expected[1])
    with pytest.raises(ValueError, match="unknown keys"):
        RdimKD(stages=[{"index": -1, "weigth": 1.0}])


def test_unfitted_projection_is_an_error():
    method, student, teacher, loader = _setup("pca")
    with pytest.raises(RuntimeError, match="not fitted"):
        method.training_step(next(iter(loader)), StepContext(student=student, teacher=teacher))


# ---------------------------------------------------------------------------------------------
# Through Hydra and Lightning.


@pytest.mark.parametrize("projection", ["random", "pca", "ae"])
def test_fast_dev_run(projection, tmp_path, cache_dir):
    extra = ["method.ae_epochs=1"] if projection == "ae" else []
    metrics = run_train(
        [*FAST, "method=rdim", f"method.projection={projection}", *extra], tmp_path, cache_dir
    )
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["method"] == "rdim" and math.isfinite(on_disk["fidelity/kernel_gap"])
    assert metrics["fidelity/kernel_gap"] == on_disk["fidelity/kernel_gap"]


def test_fast_dev_run_cifar_zoo(tmp_path, cache_dir):
    metrics = run_train(
        [
            *FAST,
            "method=rdim",
            "method.projection=pca",
            *SMALL_CIFAR,
            "teacher=resnet32x4",
            "student=resnet8x4",
        ],
        tmp_path,
        cache_dir,
    )
    assert math.isfinite(metrics["fidelity/kernel_gap"])


def test_fast_dev_run_timm(tmp_path, cache_dir):
    metrics = run_train(
        [
            *FAST,
            "method=rdim",
            *SMALL_CIFAR,
            "teacher=timm",
            "student=timm",
            "student.model.name=mobilenetv3_small_050",
        ],
        tmp_path,
        cache_dir,
    )
    assert math.isfinite(metrics["fidelity/kernel_gap"])
