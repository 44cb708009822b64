"""CRD: the NCE loss and the bank update by hand, the sampler, gradient flow, state, DDP, end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from conftest import TESTS, run_train
from kdx.errors import KDXError
from kdx.methods.crd import (
    CRD,
    contrast_scores,
    dataset_labels,
    init_bank,
    last_occurrence,
    momentum_update_,
    nce_loss,
)
from kdx.models.base import ModelOutput

# The CRD row on tiny synthetic CIFAR (the same overrides as the feature-method tests, so one session
# trains the row's teacher once).
TINY_CIFAR = [
    "experiment=crd_cifar100/resnet32x4_resnet8x4",
    "dataset=synthetic_cifar",
    "dataset.input_shape=[3,16,16]",
    "dataset.datamodule.num_train=16",
    "dataset.datamodule.num_val=8",
    "dataset.datamodule.num_test=8",
    "dataset.datamodule.batch_size=8",
]


def test_nce_loss_golden():
    # one example, K = 1 negative, N = 2: noise K/N = 0.5 (eps 1e-7 is below the tolerance)
    #   positive p = 1.0: log(1 / (1 + 0.5)) = -log 1.5
    #   negative p = 0.5: log(0.5 / (0.5 + 0.5)) = -log 2
    #   loss = log 1.5 + log 2 = log 3
    assert nce_loss(torch.tensor([[1.0, 0.5]]), num_data=2).item() == pytest.approx(math.log(3), abs=1e-6)
    # a second example with p = (0.5, 1.0): log(1/0.5·(0.5+0.5)) + log((1+0.5)/0.5) = log 2 + log 3;
    # the batch mean of the two: (log 3 + log 6) / 2
    probs = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    assert nce_loss(probs, num_data=2).item() == pytest.approx((math.log(3) + math.log(6)) / 2, abs=1e-6)


def test_momentum_update_golden_and_in_place():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    ptr = bank.data_ptr()
    # row 0: normalize(0.5·(1, 0) + 0.5·(0, 1)) = (1, 1)/√2; row 2: normalize(0.5·(0.6, 0.8) + 0.5·(0.6, 0.8))
    momentum_update_(bank, torch.tensor([0, 2]), torch.tensor([[0.0, 1.0], [0.6, 0.8]]), momentum=0.5)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(bank, torch.tensor([[s, s], [0.0, 1.0], [0.6, 0.8]]))
    assert bank.data_ptr() == ptr
    # momentum 0.75 keeps three quarters of the old row: normalize(0.75·(1, 0) + 0.25·(0, 1)) = (3, 1)/√10
    bank = torch.tensor([[1.0, 0.0]])
    momentum_update_(bank, torch.tensor([0]), torch.tensor([[0.0, 1.0]]), momentum=0.75)
    torch.testing.assert_close(bank, torch.tensor([[3.0, 1.0]]) / math.sqrt(10))


def test_contrast_scores_golden_and_both_paths_agree():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # bank[1]·(0.6, 0.8) = 0.8, bank[0]·(0.6, 0.8) = 0.6
    out = contrast_scores(bank, torch.tensor([[0.6, 0.8]]), torch.tensor([[1, 0]]))
    torch.testing.assert_close(out, torch.tensor([[0.8, 0.6]]))
    generator = torch.Generator().manual_seed(0)
    anchors = torch.randn(3, 4, generator=generator)
    small, large = torch.randn(6, 4, generator=generator), torch.randn(200, 4, generator=generator)
    large[:6] = small
    index = torch.randint(0, 6, (3, 5), generator=generator)
    # 6 <= 4·5: dense product then gather; 200 > 4·5: gathered rows then bmm — same numbers
    torch.testing.assert_close(contrast_scores(small, anchors, index), contrast_scores(large, anchors, index))


def test_last_occurrence_keeps_the_last_copy():
    unique, last = last_occurrence(torch.tensor([5, 2, 5, 7]))
    assert unique.tolist() == [2, 5, 7] and last.tolist() == [1, 2, 3]


class Identity2(nn.Module):
    """A 'model' whose embedding is its input; only the classifier width is read by CRD.setup."""

    def __init__(self, dim: int = 2):
        super().__init__()
        self.classifier = nn.Linear(dim, 3)


def tiny_crd(num_data: int = 4, labels: list[int] | None = None, **kwargs) -> CRD:
    method = CRD(feat_dim=2, **{"nce_k": 1, "nce_t": 0.5, "nce_m": 0.5, **kwargs})
    method.setup(Identity2(), Identity2(), None)
    dataset = torch.utils.data.TensorDataset(
        torch.zeros(num_data, 2), torch.tensor(labels or [i % 2 for i in range(num_data)])
    )
    method.prepare_data(dataset)
    for head in (method.embed_student, method.embed_teacher):
        with torch.no_grad():
            head.linear.weight.copy_(torch.eye(2))
            head.linear.bias.zero_()
    return method


def test_crd_loss_on_a_tiny_bank_golden():
    method = tiny_crd(num_data=4)
    # every bank row is (0, 1) and every anchor (1, 0): all scores are 0, exp(0/τ) = 1, so
    # Z = N·mean(1) = 4 and every p = 1/4. With K = 1, noise K/N = 1/4:
    #   positive: log((1/4) / (1/4 + 1/4)) = -log 2,  negative: log((1/4) / (1/4 + 1/4)) = -log 2
    #   each NCE term = 2·log 2, the two together 4·log 2
    method.memory_student = torch.tensor([[0.0, 1.0]]).repeat(4, 1)
    method.memory_teacher = torch.tensor([[0.0, 1.0]]).repeat(4, 1)
    x = torch.tensor([[2.0, 0.0]])  # normalized by the head to (1, 0)
    loss = method.contrastive_loss(x, x, torch.tensor([1]), sample_index=torch.tensor([[1, 2]]))
    assert loss.item() == pytest.approx(4 * math.log(2), abs=1e-5)
    assert method.normalizers.tolist() == pytest.approx([4.0, 4.0])
    # the update waits for the next batch (this one's backward still reads the bank) ...
    assert torch.equal(method.memory_student[1], torch.tensor([0.0, 1.0]))
    method.flush_bank_update()
    # ... then row 1 = normalize(0.5·(0, 1) + 0.5·(1, 0)) = (1, 1)/√2 in both banks; the others stay
    s = 1 / math.sqrt(2)
    for bank in (method.memory_student, method.memory_teacher):
        torch.testing.assert_close(bank[1], torch.tensor([s, s]))
        torch.testing.assert_close(bank[[0, 2, 3]], torch.tensor([[0.0, 1.0]]).repeat(3, 1))


def test_normalizer_is_fixed_at_the_first_step():
    method = tiny_crd(num_data=4)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    method.contrastive_loss(x, x, torch.tensor([0, 1]))
    first = method.normalizers.clone()
    method.contrastive_loss(x * 3, x, torch.tensor([2, 3]))
    assert torch.equal(method.normalizers, first) and (first > 0).all()


@pytest.mark.parametrize("nce_k", [3, 50])  # 3 <= 4 other-class examples: distinct; 50: with replacement
def test_negatives_come_from_other_classes(nce_k):
    labels = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    method = tiny_crd(num_data=10, labels=labels, nce_k=nce_k)
    index = torch.tensor([0, 4, 8, 9])
    sample = method.sample_index(index)
    assert sample.shape == (4, nce_k + 1)
    assert torch.equal(sample[:, 0], index)
    y = torch.tensor(labels)
    assert (y[sample[:, 1:]] != y[index].unsqueeze(1)).all()
    if nce_k == 3:
        assert all(len(set(row.tolist())) == nce_k for row in sample[:, 1:])
    else:  # all 6 examples of other classes show up for an example of class 0
        assert set(sample[0, 1:].tolist()) == set(range(4, 10))


def test_uniform_negatives_cover_the_training_set():
    method = tiny_crd(num_data=10, negatives="uniform", nce_k=400)
    sample = method.sample_index(torch.tensor([3]))
    assert set(sample[0, 1:].tolist()) == set(range(10))


def test_gradient_flow_heads_and_student_trained_teacher_untouched():
    torch.manual_seed(0)
    method = CRD(feat_dim=4, nce_k=5)
    student, teacher = nn.Linear(3, 6), nn.Linear(3, 8).requires_grad_(False)
    student.classifier, teacher.classifier = nn.Linear(6, 2), nn.Linear(8, 2)
    method.setup(student, teacher, None)
    method.prepare_data(torch.utils.data.TensorDataset(torch.zeros(12, 3), torch.arange(12) % 3))
    x, y, index = torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 3, 7, 11])
    out_s = ModelOutput(student.classifier(student(x)), student(x))
    with torch.no_grad():
        out_t = ModelOutput(teacher.classifier(teacher(x)), teacher(x))
    terms = method.loss(out_s, out_t, y, index)
    terms["loss"].backward()
    for module in (method.embed_student, method.embed_teacher, student):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert set(terms) == {"loss", "ce", "crd"}
    assert torch.allclose(terms["loss"], terms["ce"] + 0.8 * terms["crd"])


def test_bank_is_updated_in_place_and_survives_a_state_dict_round_trip():
    method = tiny_crd(num_data=6)
    ptr_s, ptr_t = method.memory_student.data_ptr(), method.memory_teacher.data_ptr()
    before = method.memory_student.clone()
    x = torch.randn(2, 2)
    for index in ([0, 1], [2, 3], [4, 5]):
        method.contrastive_loss(x, x, torch.tensor(index))
    state = method.state_dict()  # saving applies the queued update first
    assert (method.memory_student.data_ptr(), method.memory_teacher.data_ptr()) == (ptr_s, ptr_t)
    assert not torch.equal(method.memory_student, before)
    fresh = tiny_crd(num_data=6)
    assert not torch.equal(fresh.memory_student, method.memory_student)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.memory_student, method.memory_student)
    assert torch.equal(fresh.memory_teacher, method.memory_teacher)
    assert torch.equal(fresh.normalizers, method.normalizers) and fresh._normalized


def test_bank_init_is_seeded_and_in_range():
    a, b = init_bank(5, 12, seed=3), init_bank(5, 12, seed=3)
    assert torch.equal(a, b) and a.abs().max() <= 1 / math.sqrt(12 / 3)
    assert not torch.equal(a, init_bank(5, 12, seed=4))


def test_bad_input_is_one_clear_error():
    with pytest.raises(ValueError, match="nce_m"):
        CRD(nce_m=1.0)
    with pytest.raises(ValueError, match="negatives"):
        CRD(negatives="hard")
    method = CRD(feat_dim=2, num_data=5)
    method.setup(Identity2(), Identity2(), None)
    with pytest.raises(KDXError, match="num_data=5"):
        method.prepare_data(torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])))
    with pytest.raises(KDXError, match="two classes"):
        CRD(feat_dim=2).set_labels(torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# DDP: two CPU processes (trainer=ddp_sim); every rank's bank must be the same.


class BankProbe(Callback):
    """Saves each rank's banks and the indices it trained on (loaded by the DDP test's subprocess)."""

    def __init__(self, out: str):
        self.out, self.seen = Path(out), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch[2].detach().cpu())

    def on_train_end(self, trainer, pl_module):
        method = pl_module.method
        method.flush_bank_update()
        torch.save(
            {
                "student": method.memory_student.cpu(),
                "teacher": method.memory_teacher.cpu(),
                "normalizers": method.normalizers.cpu(),
                "seen": torch.cat(self.seen),
            },
            self.out / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.e2e
def test_ddp_sim_keeps_the_banks_identical_on_both_ranks(tmp_path, cache_dir):
    env = {
        **os.environ,
        "KDX_ROOT_DIR": str(tmp_path),
        "KDX_CACHE_DIR": str(cache_dir),
        "OMP_NUM_THREADS": "1",
        # this module (its BankProbe callback) and the conftest it imports
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), str(TESTS), os.environ.get("PYTHONPATH", "")]
        ),
    }
    overrides = [
        "trainer=ddp_sim",
        "debug=limit",
        "method=crd",
        "method.nce_k=64",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=1",
        "+callbacks.bank_probe._target_=test_crd.BankProbe",
        f"+callbacks.bank_probe.out={tmp_path}",
    ]
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "kdx-train"), *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("logs/**/metrics.json")]
    assert record["status"] == "ok"
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for key in ("student", "teacher", "normalizers"):
        assert torch.equal(rank0[key], rank1[key]), key
    # each rank saw its own examples, yet each rank's bank moved on the other's rows too
    only_rank1 = sorted(set(rank1["seen"].tolist()) - set(rank0["seen"].tolist()))
    never = sorted(
        set(range(rank0["student"].shape[0])) - set(torch.cat([rank0["seen"], rank1["seen"]]).tolist())
    )
    assert only_rank1 and never
    init = init_bank(rank0["student"].shape[0], 128, seed=0)
    assert not torch.equal(rank0["student"][only_rank1], init[only_rank1])
    assert torch.equal(rank0["student"][never], init[never])


def test_dataset_labels_reads_the_wrapped_targets_without_loading_inputs():
    from kdx.data.base import IndexedDataset
    from kdx.data.cifar import TransformedSubset

    class Targets(torch.utils.data.Dataset):
        targets = [3, 1, 4, 1, 5]

        def __len__(self):
            return 5

        def __getitem__(self, i):
            raise AssertionError("no item is loaded")

    nested = IndexedDataset(TransformedSubset(Targets(), [4, 0, 2], transform=lambda x: x))
    assert dataset_labels(nested).tolist() == [5, 3, 4]
    subset = torch.utils.data.Subset(
        torch.utils.data.TensorDataset(torch.zeros(4, 1), torch.tensor([7, 8, 9, 6])), [3, 1]
    )
    assert dataset_labels(subset).tolist() == [6, 8]


def test_resume_matches_uninterrupted_run(tmp_path, cache_dir):
    """The banks, Z and the negatives (seeded by step) come back exactly after a resume."""
    short = ["debug=limit", "method=crd", "method.nce_k=32", "logger=csv", "print_summary=false"]
    straight = run_train(short, tmp_path / "straight", cache_dir)
    run_train([*short, "+trainer.max_steps=4"], tmp_path / "cut", cache_dir)  # one epoch of 4 batches
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    resumed = run_train([*short, f"ckpt_path={last}"], tmp_path / "resumed", cache_dir)
    assert resumed["epochs"] == straight["epochs"] == 2

    def state(run: str) -> dict:
        ckpt = torch.load(tmp_path / run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        out = {k: v for k, v in ckpt["state_dict"].items() if k.startswith(("student.", "method."))}
        out.update({f"bank.{k}": v for k, v in out.pop("method._extra_state").items()})
        return out

    a, b = state("straight"), state("resumed")
    assert a.keys() == b.keys() and {"bank.memory_student", "method.normalizers"} <= a.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
