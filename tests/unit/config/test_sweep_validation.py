"""Sweeps select on validation: hparams_search=* holds out a validation split on data sets whose
validation is the test set by default (CIFAR), and leaves the published protocol alone otherwise."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from conftest import compose_train


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_cifar_sweeps_hold_out_validation_plain_runs_do_not(dataset, tmp_path, cache_dir):
    plain = compose_train([f"dataset={dataset}"], tmp_path, cache_dir)
    assert plain.dataset.datamodule.val_fraction == 0.0  # validation = test, as RepDistiller/CRD report
    swept = compose_train([f"dataset={dataset}", "hparams_search=kd_optuna"], tmp_path, cache_dir)
    assert swept.dataset.datamodule.val_fraction == 0.1
    assert swept.monitor == "val/student/acc"
    # the data module takes it: 10 % of the 50 000 training images become validation
    dm = instantiate(swept.dataset.datamodule)
    assert dm.val_fraction == 0.1


def test_mnist1d_sweeps_keep_their_own_held_out_split(tmp_path, cache_dir):
    plain = compose_train([], tmp_path, cache_dir)
    swept = compose_train(["hparams_search=backward_optuna"], tmp_path, cache_dir)
    assert swept.dataset.datamodule.val_fraction == plain.dataset.datamodule.val_fraction > 0
