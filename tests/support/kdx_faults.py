"""Faults injected into real runs by the tests (importable by subprocesses through PYTHONPATH).

Each is a KD subclass with KD's signature, so ``method=kd method._target_=kdx_faults.<Name>``
composes against KD's typed schema.
"""

from __future__ import annotations

import torch

from kdx.methods.kd import KD


class BugInStep(KD):
    """A programming error (not a user error) at the first training step."""

    def training_step(self, batch, ctx):
        raise RuntimeError("injected bug: this is not a KDXError")


class NaNOnRankOne(KD):
    """The loss turns NaN on DDP rank 1 only, from its second step on; rank 0 stays finite."""

    def training_step(self, batch, ctx):
        terms = super().training_step(batch, ctx)
        if ctx.rank == 1 and ctx.step >= 1:
            terms["loss"] = terms["loss"] * torch.tensor(float("nan"))
        return terms


class SlowStep(KD):
    """KD, a tenth of a second slower per training step: a signal lands mid-training, the figures are KD's."""

    def training_step(self, batch, ctx):
        import time

        time.sleep(0.1)
        return super().training_step(batch, ctx)
