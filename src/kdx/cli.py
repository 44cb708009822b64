"""The console scripts ``kdx-train``, ``kdx-eval`` and ``kdx-bench``: the front door
(:mod:`kdx.front_door`: ``--help`` and the checks that need no torch), then the entry point."""

from __future__ import annotations

from kdx.front_door import (  # noqa: F401 - the front door's helpers, where callers look for them
    _front_door,
    composition_error,
    conf_root,
    front_door,
    help_text,
    launch,
    misspelt_group,
    options,
)


def train() -> None:
    front_door("train")
    from kdx.train import main  # torch, Lightning: only once the front door let the run through

    launch("train", main)


def eval() -> None:  # noqa: A001 - the console script's name
    front_door("eval")
    from kdx.eval import main  # torch, Lightning: only once the front door let the run through

    launch("eval", main)


def bench() -> None:
    front_door("bench")
    from kdx.bench import main  # torch, Lightning: only once the front door let the run through

    launch("bench", main)
