"""Length-grouped training batches for text: seeded, every example once, grouped, resumable, DDP-sharded."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.fabric.utilities.data import _replace_dunder_methods
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from kdx.data.sampling import EpochSeededSampler, LengthGroupedBatchSampler, ResumableLoader
from kdx.data.text import TextDataModule, TextDataset, text_lengths, trim_padding

N, MAX_LEN = 203, 24  # 203: the last batch of 8 is short


def _lengths(n: int = N, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, MAX_LEN + 1, (n,), generator=torch.Generator().manual_seed(seed))


def _text_set(n: int = N) -> TextDataset:
    lengths = _lengths(n)
    mask = (torch.arange(MAX_LEN)[None] < lengths[:, None]).long()
    ids = torch.randint(5, 50, (n, MAX_LEN)) * mask
    return TextDataset({"input_ids": ids, "attention_mask": mask}, torch.randint(0, 2, (n,)))


class TinyText(TextDataModule):
    name = "tiny_text"
    num_classes = 2

    def setup(self, stage=None):
        if self.train_set is None:
            self.train_set = _text_set()
            self.val_set = self.test_set = _text_set(37)


def _sampler(epoch: int = 0, seed: int = 0, group: bool = True, drop_last: bool = False, **kw):
    inner = EpochSeededSampler(N, seed)
    inner.set_epoch(epoch)
    return LengthGroupedBatchSampler(inner, 8, drop_last, _lengths(), seed=seed, group=group, **kw)


def _padding(batches, lengths) -> float:
    """Mean fraction of a batch's trimmed tokens that are padding."""
    fractions = [1 - lengths[b].float().mean() / lengths[b].max() for b in batches]
    return float(torch.stack(fractions).mean())


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_example_once_per_epoch_in_a_plain_cuts_number_of_batches(drop_last):
    batches = list(_sampler(epoch=3, drop_last=drop_last, chunk_batches=4))
    seen = sorted(i for b in batches for i in b)
    assert len(batches) == len(_sampler(drop_last=drop_last)) == (N // 8 if drop_last else -(-N // 8))
    if drop_last:
        assert len(seen) == len(set(seen)) == (N // 8) * 8 and all(len(b) == 8 for b in batches)
    else:
        assert seen == list(range(N))


def test_same_seed_and_epoch_same_batches_other_epoch_or_seed_other_batches():
    assert list(_sampler(epoch=2)) == list(_sampler(epoch=2))
    assert list(_sampler(epoch=2)) != list(_sampler(epoch=3))
    assert list(_sampler(epoch=2)) != list(_sampler(epoch=2, seed=1))


def test_batches_are_grouped_by_length():
    lengths = _lengths()
    grouped, plain = list(_sampler(chunk_batches=8)), list(_sampler(group=False))
    # random batches of lengths 2..24 pad about a third; grouped ones nearly nothing
    assert _padding(grouped, lengths) < 0.5 * _padding(plain, lengths)
    # the batch order is shuffled: not sorted by length across the epoch
    maxima = [int(lengths[b].max()) for b in grouped]
    assert maxima != sorted(maxima)


def test_without_grouping_the_order_is_the_plain_shuffled_loaders():
    inner = EpochSeededSampler(N, 5)
    inner.set_epoch(4)
    expected = list(BatchSampler(inner, 8, False))
    assert list(_sampler(epoch=4, seed=5, group=False)) == expected


def test_a_resumed_loader_serves_the_batches_the_epoch_had_left():
    dataset = _text_set()

    def loader():
        return ResumableLoader(dataset, batch_sampler=_sampler(), collate_fn=trim_padding)

    first = loader()
    first.batch_sampler.sampler.set_epoch(2)
    whole = [b[2].tolist() for b in first]
    partial = loader()
    partial.batch_sampler.sampler.set_epoch(2)
    iterator = iter(partial)
    for _ in range(5):
        next(iterator)
    state = partial.state_dict()
    assert state == {"epoch": 2, "batches": 5}
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.batch_sampler.sampler.set_epoch(2)  # Lightning sets the epoch before the first batch
    assert [b[2].tolist() for b in resumed] == whole[5:]
    assert resumed.state_dict()["batches"] == len(whole)
    # the next epoch starts from its first batch
    resumed.batch_sampler.sampler.set_epoch(3)
    assert len(list(resumed)) == len(whole)
    # a saved place of another epoch is not applied
    other = loader()
    other.load_state_dict({"epoch": 1, "batches": 5})
    other.batch_sampler.sampler.set_epoch(2)
    assert [b[2].tolist() for b in other] == whole


def test_ddp_shards_are_disjoint_cover_the_split_and_stay_grouped():
    """What Lightning does under DDP: inject a DistributedSampler into the batch sampler."""
    dataset = _text_set()
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = ResumableLoader(dataset, batch_sampler=_sampler(chunk_batches=4), collate_fn=trim_padding)
    shards = []
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        ranked = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
        assert isinstance(ranked, ResumableLoader)
        assert isinstance(ranked.batch_sampler, LengthGroupedBatchSampler)
        ranked.batch_sampler.sampler.set_epoch(1)
        shards.append(list(ranked.batch_sampler))
    assert len(shards[0]) == len(shards[1])  # every rank steps the same number of times
    a, b = ({i for batch in shard for i in batch} for shard in shards)
    # DistributedSampler pads the smaller shard with one repeated example when N is odd
    assert len(a & b) <= 1 and a | b == set(range(N))
    lengths = _lengths()
    assert _padding(shards[0], lengths) < 0.5 * _padding(list(_sampler(group=False)), lengths)


def test_text_data_module_loaders(tmp_path):
    dm = TinyText(batch_size=8)
    dm.setup()
    train = dm.train_dataloader()
    assert isinstance(train, ResumableLoader) and dm.batching == "length_grouped"
    assert sorted(i for b in train for i in b[2].tolist()) == list(range(N))
    val = [b for b in dm.val_dataloader()]
    lengths = [int(length) for b in val for length in b[0]["attention_mask"].sum(1)]
    assert lengths == sorted(lengths) and len(lengths) == 37
    assert text_lengths(dm.val_set).tolist() == dm.val_set.encodings["attention_mask"].sum(1).tolist()
    plain = TinyText(batch_size=8, length_grouping=False)
    plain.setup()
    assert plain.batching == "shuffled"
    inner = EpochSeededSampler(N, torch.initial_seed())
    assert [b[2].tolist() for b in plain.train_dataloader()] == list(BatchSampler(inner, 8, False))


class _Record(L.LightningModule):
    """Records the example indices of every training batch; a real (tiny) optimisation."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.EmbeddingBag(64, 2)
        self.seen: list[tuple[int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.seen.append((self.global_step, index.tolist()))
        return torch.nn.functional.cross_entropy(self.embed(x["input_ids"]), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, max_epochs: int, ckpt_path=None, callbacks=()):
    L.seed_everything(3, verbose=False)
    module = _Record()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=TinyText(batch_size=32), ckpt_path=ckpt_path)
    return module.seen


def test_lightning_resumes_mid_epoch_with_the_remaining_batches(tmp_path):
    # 203 examples / 32 = 7 batches per epoch; a checkpoint after step 10 is epoch 1, batch 3
    every = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=10, save_top_k=-1, filename="{step}")
    whole = _fit(tmp_path, 2, callbacks=[every])
    assert len(whole) == 14
    resumed = _fit(tmp_path, 2, ckpt_path=str(tmp_path / "ck" / "step=10.ckpt"))
    assert resumed == whole[10:]
