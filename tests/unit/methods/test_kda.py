"""KDA: the official loss and centre bookkeeping (docs/methods.md §1), gradient flow, DDP, resume, e2e."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, SMALL_CIFAR, run_train
from kdx.context import StepContext
from kdx.data.synthetic import SyntheticDataModule
from kdx.methods.kda import KDA, kda_loss, landmark_similarities
from kdx.models.adapter import as_feature_model
from kdx.models.small import MLP

# ---------------------------------------------------------------------------------------------
# The loss on its own.


def _centres(method: KDA):
    """The class centres of the method's first (here: only) layer."""
    return method.centres[method.layers[0]]


def test_loss_is_zero_when_features_and_centres_agree():
    torch.manual_seed(0)
    feats, centres = torch.randn(6, 5), torch.randn(4, 5)
    assert kda_loss(feats, feats.clone(), centres, centres.clone()).item() == 0.0


def test_golden_value_2x2():
    # Hand derivation (B = 2 examples, C = 2 classes, d = 2):
    #   teacher centres C_t = I  ->  S_t = F_t = [[1, 2], [0, 2]],  ‖S_t‖_F = √(1 + 4 + 0 + 4) = 3
    #   student centres C_s = [[1, 0], [0, 2]]  ->  S_s[i] = [F_s[i,0], 2·F_s[i,1]]
    #   F_s = [[1.5, 1], [2, 0.25]]  ->  S_s = [[1.5, 2], [2, 0.5]]
    #   S_s − S_t = [[0.5, 0], [2, −1.5]]; smooth-L1 with β = 1: 0.5·x² if |x| < 1 else |x| − 0.5
    #     0.5 -> 0.125,  0 -> 0,  2 -> 1.5,  −1.5 -> 1.0;  sum = 2.625
    #   loss = 2.625 / 3 = 0.875
    f_s = torch.tensor([[1.5, 1.0], [2.0, 0.25]])
    f_t = torch.tensor([[1.0, 2.0], [0.0, 2.0]])
    c_s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    c_t = torch.eye(2)
    assert kda_loss(f_s, f_t, c_s, c_t).item() == pytest.approx(0.875, abs=1e-7)


@pytest.mark.parametrize("d_s,d_t", [(5, 5), (3, 11), (16, 4)])
def test_similarity_shape_is_batch_by_classes(d_s, d_t):
    b, c = 7, 4
    s = landmark_similarities(torch.randn(b, d_s), torch.randn(c, d_s))
    t = landmark_similarities(torch.randn(b, d_t), torch.randn(c, d_t))
    assert s.shape == t.shape == (b, c)
    loss = kda_loss(torch.randn(b, d_s), torch.randn(b, d_t), torch.randn(c, d_s), torch.randn(c, d_t))
    assert loss.dim() == 0 and torch.isfinite(loss)


def test_no_gradient_reaches_centres_or_teacher():
    f_s = torch.randn(6, 5, requires_grad=True)
    f_t = torch.randn(6, 3, requires_grad=True)
    c_s = torch.randn(4, 5, requires_grad=True)
    c_t = torch.randn(4, 3, requires_grad=True)
    kda_loss(f_s, f_t, c_s, c_t).backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    assert f_t.grad is None and c_s.grad is None and c_t.grad is None


# ---------------------------------------------------------------------------------------------
# The method driven by a stand-in for the LightningModule.


def _models(num_classes=4, d_in=6, d_s=5, d_t=9, seed=0):
    torch.manual_seed(seed)
    student = as_feature_model(MLP(num_classes, (d_in,), hidden=(d_s,)))
    teacher = as_feature_model(MLP(num_classes, (d_in,), hidden=(d_t,))).eval().requires_grad_(False)
    return student, teacher


def _context(student, teacher, epoch):
    return StepContext(student=student, teacher=teacher, epoch=epoch)


def _shaped(input_shape) -> SyntheticDataModule:
    """A data module whose ``input_shape`` KDA's ``setup`` probes the models with."""
    return SyntheticDataModule(input_shape=input_shape, num_classes=4)


def _batches(x, y, size):
    for start in range(0, len(x), size):
        yield x[start : start + size], y[start : start + size], torch.arange(start, min(start + size, len(x)))


def _epoch(method, ctx, x, y, size=7):
    method.on_train_epoch_start(ctx)
    terms = [method.training_step(b, ctx) for b in _batches(x, y, size)]
    method.on_train_epoch_end(ctx)
    return terms


def test_centres_are_per_class_means_of_the_previous_epoch():
    student, teacher = _models()
    method = KDA(warm=0)
    method.setup(student, teacher, _shaped((6,)))
    assert _centres(method).student_centres.shape == (4, 5) and _centres(method).teacher_centres.shape == (
        4,
        9,
    )
    torch.manual_seed(1)
    x, y = torch.randn(30, 6), torch.tensor([0, 1, 2] * 10)  # class 3 never appears
    _epoch(method, _context(student, teacher, 0), x, y)  # uneven batches of 7: 7, 7, 7, 7, 2
    with torch.no_grad():
        e_s, e_t = student(x, ("embedding",)).embedding, teacher(x, ("embedding",)).embedding
    for k in range(3):
        torch.testing.assert_close(
            _centres(method).student_centres[k], e_s[y == k].mean(0), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            _centres(method).teacher_centres[k], e_t[y == k].mean(0), rtol=1e-5, atol=1e-6
        )
    assert _centres(method).centre_counts.tolist() == [10, 10, 10, 0]
    assert _centres(method).student_centres[3].abs().sum() == 0 and int(_centres(method).centres_epoch) == 0
    # next epoch sees only class 0: its centre moves, the others keep theirs (counted again, not reused)
    before = _centres(method).teacher_centres.clone()
    x0 = torch.randn(5, 6)
    _epoch(method, _context(student, teacher, 1), x0, torch.zeros(5, dtype=torch.long))
    with torch.no_grad():
        torch.testing.assert_close(
            _centres(method).teacher_centres[0], teacher(x0, ("embedding",)).embedding.mean(0)
        )
    torch.testing.assert_close(_centres(method).teacher_centres[1:], before[1:])
    assert (
        _centres(method).centre_counts.tolist() == [5, 0, 0, 0] and int(_centres(method).centres_epoch) == 1
    )


def test_warm_up_and_weighting():
    student, teacher = _models()
    method = KDA(alpha=0.5, warm=2)
    method.setup(student, teacher, _shaped((6,)))
    torch.manual_seed(2)
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    first = _epoch(method, _context(student, teacher, 0), x, y, size=8)
    assert all(t["kda"].item() == 0.0 for t in first)  # no centres yet: 0, not NaN
    second = _epoch(method, _context(student, teacher, 1), x, y, size=8)  # centres exist, epoch < warm
    assert second[0]["kda"].item() > 0 and not second[0]["kda"].requires_grad
    torch.testing.assert_close(second[0]["loss"], second[0]["ce"])
    third = method.training_step(next(_batches(x, y, 8)), _context(student, teacher, 2))
    torch.testing.assert_close(third["loss"], third["ce"] + 0.5 * third["kda"])
    out_s, out_t = student(x[:8], method.reads), teacher(x[:8], method.reads)
    expected = kda_loss(
        out_s.embedding, out_t.embedding, _centres(method).student_centres, _centres(method).teacher_centres
    )
    torch.testing.assert_close(third["kda"], expected)


def test_logits_layer_and_combo_terms():
    student, teacher = _models()
    method = KDA(warm=0, layer="logits", kd_weight=0.9, ce_weight=0.1, temperature=4.0)
    method.setup(student, teacher, _shaped((6,)))
    assert _centres(method).student_centres.shape == _centres(method).teacher_centres.shape == (4, 4)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    _epoch(method, _context(student, teacher, 0), x, y, size=8)
    terms = method.training_step((x, y, torch.arange(8)), _context(student, teacher, 1))
    p_s, p_t = F.log_softmax(student(x).logits / 4, -1), F.softmax(teacher(x).logits / 4, -1)
    torch.testing.assert_close(terms["kd"], F.kl_div(p_s, p_t, reduction="batchmean") * 16)
    torch.testing.assert_close(terms["loss"], 0.1 * terms["ce"] + 0.04 * terms["kda"] + 0.9 * terms["kd"])


def test_the_kda_term_alone_reaches_every_student_layer():
    student, teacher = _models()
    method = KDA(warm=0)
    method.setup(student, teacher, _shaped((6,)))
    assert list(method.parameters()) == []  # KDA's state is buffers only
    x, y = torch.randn(12, 6), torch.randint(0, 4, (12,))
    _epoch(method, _context(student, teacher, 0), x, y, size=12)
    optimizer = torch.optim.SGD([*student.parameters(), *method.parameters()], lr=0.1)
    terms = method.training_step((x, y, torch.arange(12)), _context(student, teacher, 1))
    assert terms["kda"].requires_grad and terms["kda"].item() > 0
    student.zero_grad()
    terms["kda"].backward(retain_graph=True)  # the KDA term alone reaches every student layer
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in student.named_parameters()
        if "classifier" not in n
    )
    terms["loss"].backward()
    optimizer.step()
    assert all(not b.requires_grad for b in method.buffers())


def test_state_dict_round_trip_carries_centres_and_partial_sums():
    student, teacher = _models()
    method = KDA(warm=0)
    method.setup(student, teacher, _shaped((6,)))
    x, y = torch.randn(14, 6), torch.randint(0, 4, (14,))
    _epoch(method, _context(student, teacher, 0), x, y)
    ctx = _context(student, teacher, 1)
    method.on_train_epoch_start(ctx)
    method.training_step((x[:7], y[:7], torch.arange(7)), ctx)  # half of epoch 1, then "crash"
    state = method.state_dict()
    restored = KDA(warm=0)  # never set up: LazyBuffers sizes the buffers from the state_dict
    restored.load_state_dict(state)
    assert set(state) >= {f"centres.embedding.{n}" for n in ("student_centres", "teacher_centres")}
    for name in ("student_centres", "teacher_centres", "centre_counts", "centres_epoch"):
        assert torch.equal(getattr(_centres(restored), name), getattr(_centres(method), name)), name
    for m in (method, restored):  # both finish epoch 1 the same way
        m.on_train_epoch_start(ctx)
        m.training_step((x[7:], y[7:], torch.arange(7, 14)), ctx)
        m.on_train_epoch_end(ctx)
    torch.testing.assert_close(_centres(restored).teacher_centres, _centres(method).teacher_centres)
    with torch.no_grad():
        e_t = teacher(x, ("embedding",)).embedding
    for k in y.unique().tolist():
        torch.testing.assert_close(
            _centres(restored).teacher_centres[k], e_t[y == k].mean(0), rtol=1e-5, atol=1e-6
        )


def test_combo_sums_the_term_over_layers_each_with_its_centres():
    student, teacher = _models()
    method = KDA(warm=0, layer=["embedding", "logits"])
    method.setup(student, teacher, _shaped((6,)))
    emb, log = method.centres["embedding"], method.centres["logits"]
    assert emb.student_centres.shape == (4, 5) and emb.teacher_centres.shape == (4, 9)
    assert log.student_centres.shape == log.teacher_centres.shape == (4, 4)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    _epoch(method, _context(student, teacher, 0), x, y, size=8)
    terms = method.training_step((x, y, torch.arange(8)), _context(student, teacher, 1))
    out_s, out_t = student(x, method.reads), teacher(x, method.reads)
    expected = kda_loss(
        out_s.embedding, out_t.embedding, emb.student_centres, emb.teacher_centres
    ) + kda_loss(out_s.logits, out_t.logits, log.student_centres, log.teacher_centres)
    torch.testing.assert_close(terms["kda"], expected)
    with pytest.raises(ValueError, match="method.layer"):
        KDA(layer=["embedding", "embedding"])


def test_warmup_follows_warm_then_cosine():
    # 10 steps over 5 epochs, warm-up 1 epoch = 2 iterations: factors max(1, it)/2 for it < 2
    # (0.5, 0.5), then 0.5·(1 + cos(π·(it − 2)/8)) for it = 2..9
    from kdx.schedules import warmup_cosine

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = warmup_cosine(opt, total_steps=10, warmup_epochs=1, epochs=5)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.5, 0.5, *(0.5 * (1 + math.cos(math.pi * (it - 2) / 8)) for it in range(2, 10))]
    assert lrs == pytest.approx(expected)


def test_sgd_kda_warmup_reads_method_warm(tmp_path, cache_dir):
    from conftest import compose_train

    cfg = compose_train(
        ["method=kda", "method.warm=3", "optim=sgd_kda", "trainer.max_epochs=30"], tmp_path, cache_dir
    )
    assert cfg.optim.scheduler.warmup_epochs == 3 and cfg.optim.scheduler.epochs == 30
    cfg = compose_train(["method=none", "optim=sgd_kda"], tmp_path, cache_dir)
    assert cfg.optim.scheduler.warmup_epochs == 5  # a method without `warm`: KDA's 5 epochs


def _global_batch_worker(rank: int, init_file: str, results):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        results[rank] = (*_kda_step(rank, world=2), _kda_step(rank, world=2, global_batch=False)[0])
    finally:
        torch.distributed.destroy_process_group()


def _kda_step(rank: int, world: int, global_batch: bool = True):
    """One KDA step on rank ``rank``'s share of a fixed batch of 12; returns the loss and the
    student's gradient after DDP's averaging over ``world`` processes (done here by hand)."""
    torch.manual_seed(0)
    student, teacher = _models()
    method = KDA(warm=0, global_batch=global_batch)
    method.setup(student, teacher, _shaped((6,)))
    _centres(method).size(4, 5, 9)
    gen = torch.Generator().manual_seed(1)
    _centres(method).student_centres.copy_(torch.randn(4, 5, generator=gen))
    _centres(method).teacher_centres.copy_(torch.randn(4, 9, generator=gen))
    _centres(method).centres_epoch.fill_(0)
    _centres(method)._has_centres = True
    x, y = torch.randn(12, 6, generator=gen), torch.randint(0, 4, (12,), generator=gen)
    share = slice(rank * 12 // world, (rank + 1) * 12 // world)
    method._epoch = 1
    kda = method.loss(student(x[share], method.reads), teacher(x[share], method.reads), y[share], None)["kda"]
    kda.backward()
    grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
    if world > 1:  # DDP averages the parameter gradients over the processes
        torch.distributed.all_reduce(grads)
        grads /= world
    return kda.item(), grads.tolist()


def test_global_batch_loss_under_ddp_equals_the_single_process_loss(tmp_path):
    # two gloo processes (the CPU stand-in for trainer=ddp_sim), each with half of the batch:
    # every process's KDA term is the single-process term over all 12 examples, and the averaged
    # gradient is the single-process gradient; per device it is not (the sum and norm are halves)
    ctx = torch.multiprocessing.get_context("fork")
    results = ctx.Manager().dict()
    procs = [
        ctx.Process(target=_global_batch_worker, args=(r, str(tmp_path / "pg"), results)) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    loss, grads = _kda_step(0, world=1)
    for rank in range(2):
        assert results[rank][0] == pytest.approx(loss, rel=1e-6)
        assert results[rank][1] == pytest.approx(grads, rel=1e-5, abs=1e-7)
        assert results[rank][2] != pytest.approx(loss, rel=1e-3)  # global_batch=false: a half-batch term


def _all_reduce_worker(rank: int, init_file: str, results):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        method = KDA(warm=0)
        _centres(method).size(3, 2, 2)
        feats = (
            torch.tensor([[1.0, 0.0], [3.0, 2.0]]) + 10 * rank
        )  # rank 0: classes 0, 1; rank 1: classes 0, 2
        y = torch.tensor([0, 1 + rank])
        _centres(method).accumulate(feats, feats, y, method._epoch)
        method.finalise_centres()
        results[rank] = (_centres(method).student_centres.tolist(), _centres(method).centre_counts.tolist())
    finally:
        torch.distributed.destroy_process_group()


def test_centres_are_all_reduced_across_processes(tmp_path):
    ctx = torch.multiprocessing.get_context("fork")
    results = ctx.Manager().dict()
    procs = [
        ctx.Process(target=_all_reduce_worker, args=(r, str(tmp_path / "pg"), results)) for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    expected = ([[6.0, 5.0], [3.0, 2.0], [13.0, 12.0]], [2, 1, 1])  # class 0: mean of [1, 0] and [11, 10]
    assert results[0] == results[1] == expected


# ---------------------------------------------------------------------------------------------
# Through Hydra and Lightning.


class CentreRecorder(L.Callback):
    """Saves the KDA state at the start of every training epoch (used by the resume test)."""

    def __init__(self, path: str):
        self.path = path
        self.records: dict[int, dict] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        m = pl_module.method
        self.records[trainer.current_epoch] = {
            "student_centres": _centres(m).student_centres.clone(),
            "teacher_centres": _centres(m).teacher_centres.clone(),
            "centres_epoch": int(_centres(m).centres_epoch),
        }
        torch.save(self.records, self.path)


def test_fast_dev_run_writes_kernel_gap(tmp_path, cache_dir):
    metrics = run_train([*FAST, "method=kda"], tmp_path, cache_dir)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["method"] == "kda" and math.isfinite(on_disk["fidelity/kernel_gap"])
    assert metrics["fidelity/kernel_gap"] == on_disk["fidelity/kernel_gap"] >= 0


def test_resume_restores_centres(tmp_path, cache_dir):
    common = [
        "debug=limit",
        "logger=csv",
        "trainer.accelerator=cpu",
        "method=kda",
        "method.warm=0",
        "test=false",
    ]
    first, second = tmp_path / "first", tmp_path / "second"
    run_train([*common, "trainer.max_epochs=1"], first, cache_dir)
    ckpt = first / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "method.centres.embedding."
    assert int(saved[prefix + "centres_epoch"]) == 0 and saved[prefix + "teacher_centres"].abs().sum() > 0
    record = second / "record.pt"
    run_train(
        [
            *common,
            "trainer.max_epochs=2",
            f"ckpt_path={ckpt}",
            "+callbacks.recorder._target_=test_kda.CentreRecorder",
            f"+callbacks.recorder.path={record}",
        ],
        second,
        cache_dir,
    )
    records = torch.load(record, weights_only=True)
    assert list(records) == [1]  # resumed straight into epoch 1 ...
    assert records[1]["centres_epoch"] == 0  # ... with epoch 0's centres, restored, not recomputed
    assert torch.equal(records[1]["student_centres"], saved[prefix + "student_centres"])
    assert torch.equal(records[1]["teacher_centres"], saved[prefix + "teacher_centres"])


def test_fast_dev_run_cifar_zoo(tmp_path, cache_dir):
    metrics = run_train(
        [*FAST, "method=kda", *SMALL_CIFAR, "teacher=resnet32x4", "student=resnet8x4"], tmp_path, cache_dir
    )
    assert math.isfinite(metrics["fidelity/kernel_gap"])


def test_fast_dev_run_timm(tmp_path, cache_dir):
    metrics = run_train(
        [*FAST, "method=kda", *SMALL_CIFAR, "teacher=timm", "student=timm"], tmp_path, cache_dir
    )
    assert math.isfinite(metrics["fidelity/kernel_gap"])


def test_unknown_layer_is_rejected():
    with pytest.raises(ValueError, match="method.layer"):
        KDA(layer="pre_logits")
