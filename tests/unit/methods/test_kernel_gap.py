"""fidelity/kernel_gap: exact against the dense n×n computation, memory independent of n², wiring."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kdx.metrics import FidelityMetrics, KernelGap, KernelGeometry, linear_cka


def dense_gap(xs: torch.Tensor, xt: torch.Tensor) -> float:
    ks, kt = xs.double() @ xs.double().t(), xt.double() @ xt.double().t()
    return (torch.linalg.matrix_norm(ks - kt) / torch.linalg.matrix_norm(kt)).item()


def streamed_gap(xs: torch.Tensor, xt: torch.Tensor, batch: int = 16) -> float:
    metric = KernelGap()
    for s, t in zip(xs.split(batch), xt.split(batch)):
        metric.update(s, t)
    return metric.compute().item()


def test_equals_the_dense_computation_with_different_widths():
    torch.manual_seed(0)
    xs, xt = torch.randn(70, 7), torch.randn(70, 5).relu()
    assert streamed_gap(xs, xt) == pytest.approx(dense_gap(xs, xt), rel=1e-6)
    assert streamed_gap(xt, xt) == pytest.approx(0.0, abs=1e-6)
    # the kernel depends on X only through XXᵀ: a rotated (or orthogonally embedded) copy has gap 0
    q, _ = torch.linalg.qr(torch.randn(9, 9, dtype=torch.float64))
    rotated = (xt.double() @ q[:5]).float()  # (70, 9), X Qᵀ with orthonormal rows
    assert streamed_gap(rotated, xt) == pytest.approx(0.0, abs=1e-5)


def test_small_gaps_keep_their_precision():
    torch.manual_seed(1)
    xt = torch.randn(64, 6, dtype=torch.float64)
    xs = xt + 1e-4 * torch.randn(64, 6, dtype=torch.float64)
    assert streamed_gap(xs, xt) == pytest.approx(dense_gap(xs, xt), rel=1e-4)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any ATen op produces while active (a CPU allocation tracker)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return out


def _largest_allocation(n: int, d: int = 12, batch: int = 32) -> int:
    torch.manual_seed(n)
    xs, xt = torch.randn(n, d), torch.randn(n, d)
    with LargestTensor() as tracker:
        streamed_gap(xs, xt, batch)
    return tracker.largest


def test_memory_does_not_grow_with_n_squared():
    # tracemalloc cannot see torch's CPU allocator, so every tensor each op allocates is recorded at
    # the dispatcher instead; the largest is max(batch·d, d²), whatever n is.
    small, large = _largest_allocation(64), _largest_allocation(2048)
    assert small == large <= max(32 * 12, 12 * 12)
    with LargestTensor() as tracker:  # the tracker does see an n×n kernel when there is one
        dense_gap(torch.randn(256, 12), torch.randn(256, 12))
    assert tracker.largest >= 256 * 256


def test_fidelity_metrics_report_it_only_with_teacher_and_embeddings():
    torch.manual_seed(2)
    logits_s, logits_t, y = torch.randn(20, 3), torch.randn(20, 3), torch.randint(0, 3, (20,))
    emb_s, emb_t = torch.randn(20, 4), torch.randn(20, 6)
    metrics = FidelityMetrics(3, with_teacher=True)
    metrics.update(logits_s[:10], logits_t[:10], y[:10], emb_s[:10], emb_t[:10])
    metrics.update(logits_s[10:], logits_t[10:], y[10:], emb_s[10:], emb_t[10:])
    out = metrics.compute()
    assert out["fidelity/kernel_gap"].item() == pytest.approx(dense_gap(emb_s, emb_t), rel=1e-5)
    assert {"fidelity/kl", "fidelity/agreement", "student/acc", "teacher/acc"} <= set(out)
    metrics.reset()
    metrics.update(logits_s, logits_t, y)  # no embeddings given: no kernel gap, the rest as before
    assert "fidelity/kernel_gap" not in metrics.compute() and "fidelity/kl" in metrics.compute()
    alone = FidelityMetrics(3, with_teacher=False)
    alone.update(logits_s, None, y, emb_s, None)
    assert "fidelity/kernel_gap" not in alone.compute()


# ---------------------------------------------------------------------------------------------
# Linear CKA, the scale-invariant companion (streamed the same way).


def dense_cka(xs: torch.Tensor, xt: torch.Tensor) -> float:
    """The textbook n×n form: ⟨HK_SH, HK_TH⟩_F / (‖HK_SH‖_F ‖HK_TH‖_F), K = X Xᵀ, H = I − 11ᵀ/n."""
    xs, xt = xs.double(), xt.double()
    n = xs.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    ks, kt = h @ xs @ xs.t() @ h, h @ xt @ xt.t() @ h
    return float((ks * kt).sum() / (ks.norm() * kt.norm()))


def streamed_cka(xs: torch.Tensor, xt: torch.Tensor, batch: int) -> float:
    metric = KernelGeometry()
    for start in range(0, len(xs), batch):
        metric.update(xs[start : start + batch], xt[start : start + batch])
    return float(metric.compute()["cka"])


def test_cka_streamed_equals_dense_with_different_widths():
    torch.manual_seed(3)
    xs = torch.randn(100, 7)
    xt = torch.cat([xs @ torch.randn(7, 5), torch.randn(100, 6)], dim=1) + 2.0  # related, not a copy
    dense = dense_cka(xs, xt)
    assert 0.05 < dense < 0.95  # a case where the value says something
    assert streamed_cka(xs, xt, batch=16) == pytest.approx(dense, rel=1e-6)  # float32 result
    assert float(linear_cka(xs, xt)) == pytest.approx(dense, rel=1e-6)


def test_cka_is_one_for_a_rotated_rescaled_or_shifted_copy():
    torch.manual_seed(4)
    xt = torch.randn(64, 8)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8))
    for copy in (xt @ rotation, 2.0 * xt, xt + 5.0, 0.3 * xt @ rotation - 1.0):
        assert streamed_cka(copy, xt, batch=10) == pytest.approx(1.0, abs=1e-6)
    # ... where the kernel gap is not scale-invariant: 2× the teacher scores ‖4K − K‖/‖K‖ = 3
    metric = KernelGeometry()
    metric.update(2.0 * xt, xt)
    assert float(metric.compute()["kernel_gap"]) == pytest.approx(3.0, rel=1e-6)
    # unrelated features score far below 1
    assert streamed_cka(torch.randn(64, 8), xt, batch=10) < 0.5


def test_fidelity_metrics_log_cka_next_to_the_kernel_gap():
    torch.manual_seed(5)
    logits, y = torch.randn(30, 3), torch.randint(0, 3, (30,))
    emb_s, emb_t = torch.randn(30, 4), torch.randn(30, 6)
    metrics = FidelityMetrics(3, with_teacher=True)
    metrics.update(logits, logits, y, emb_s, emb_t)
    out = metrics.compute()
    assert out["fidelity/cka"].item() == pytest.approx(dense_cka(emb_s, emb_t), rel=1e-5)
