"""A run's record: the one definition of ``metrics.json``.

kdx-train writes one record per run folder, whatever the outcome; kdx-table, the multirun report,
the end-of-run summary and the teacher cache read it back through :class:`RunRecord`. Every key kdx
writes is a typed field; a key with a slash (``student/acc``) maps to a field named with an
underscore (``student_acc``) through the field's ``key`` metadata. Figures whose names are not known
ahead (a callback's report, e.g. ``diag/*``) live in :attr:`RunRecord.extra` and round-trip.

Which keys a record carries:

- every record: ``status``, ``schema_version`` and the run's provenance (``seed``, ``method``,
  ``label``, ``dataset``, ``teacher``, ``student``, ``choices``, ``tags``, ``published``,
  ``config``, ``versions``), null when unknown;
- a successful run (``status: ok``): also the monitor's figures, the fit time, epochs, steps, the
  teacher's checksum and the warnings, null or empty when the run had none;
- a run that finished but learned nothing (``no_learning``: its best validation accuracy is at
  chance, :class:`kdx.callbacks.DivergenceMonitor`): the keys of a successful run (its figures
  stand) and those of one that did not succeed;
- a run that did not succeed (``failed``, ``diverged``, ``interrupted``, ...): also ``error``,
  ``error_type``, ``log``; an interrupted one also ``interrupt/signal``, ``interrupt/ckpt``,
  ``interrupt/resume`` (the command that continues it), ``epochs`` and ``steps``;
- a resumed run: ``resumed_from``;
- any other figure only when the run measured it (no ``teacher/acc`` without a teacher, no test
  figures with ``test=false``).

A record without ``schema_version`` is one written before the schema was versioned; it has the
same keys, minus those added since, and reads as the same type. This module imports neither torch
nor Lightning: kdx-table reads records in a process that never trains.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdx.utils import atomic_write_json

SCHEMA_VERSION: int = 1
RECORD_NAME = "metrics.json"
OK = "ok"
NO_LEARNING = "no_learning"
# statuses of a run that finished: its figures are what it reached (kdx-table averages them)
FINISHED = (OK, NO_LEARNING)

# Field groups: which outcome always writes a key (as null when unknown).
EVERY = "every"
SUCCESS = "success"
FAILURE = "failure"


class RecordError(ValueError):
    """A file or mapping that is not a kdx run record.

    ``reason`` says what is wrong with it; ``path``, when known, is the file it came from. The
    message is ``"<path>: <reason>"``, or the reason alone."""

    def __init__(self, reason: str, path: str | os.PathLike | None = None):
        self.reason = reason
        self.path = None if path is None else Path(path)
        super().__init__(reason if path is None else f"{path}: {reason}")


# (accepted JSON types, what the message says is expected); bool is never a number here
TEXT = ((str,), "a string")
NUMBER = ((int, float), "a number")
INTEGER = ((int,), "an integer")
STRINGS = ((list,), "a list of strings")
MAPPING = ((dict,), "a mapping")


def _key(key: str | None, kind: tuple, always: str | None = None, what: str | None = None) -> Any:
    """A record field: its metrics.json ``key`` (default: the field's name), its JSON type, the
    outcome that always writes it, and how an error message names what is expected."""
    types, default_what = kind
    return field(
        default=None, metadata={"key": key, "types": types, "what": what or default_what, "always": always}
    )


@dataclass(eq=True)
class RunRecord:
    """One run's ``metrics.json``. Figures are fractions (accuracy 0.75, not 75 %)."""

    status: str = field(metadata={"key": None, "types": TEXT[0], "what": TEXT[1], "always": EVERY})
    # provenance: what ran
    seed: int | str | None = _key(None, ((int, str), "an integer"), EVERY)
    method: str | None = _key(None, TEXT, EVERY)
    label: str | None = _key(None, TEXT, EVERY)
    dataset: str | None = _key(None, TEXT, EVERY)
    teacher: str | None = _key(None, TEXT, EVERY)
    student: str | None = _key(None, TEXT, EVERY)
    choices: dict[str, Any] | None = _key(None, MAPPING, EVERY, "a mapping of group choices")
    tags: list[str] | None = _key(None, STRINGS, EVERY)
    published: dict[str, Any] | None = _key(None, MAPPING, EVERY, "a mapping or null")
    config: dict[str, Any] | None = _key(None, MAPPING, EVERY, "the resolved config (a mapping)")
    versions: dict[str, str] | None = _key(None, MAPPING, EVERY)
    # a successful run: the monitor and the fit
    monitor: str | None = _key(None, TEXT, SUCCESS)
    monitor_mode: str | None = _key(None, TEXT, SUCCESS)
    monitor_best: float | None = _key("monitor/best", NUMBER, SUCCESS)
    student_val_acc_best: float | None = _key("student/val_acc_best", NUMBER, SUCCESS)
    fit_s: float | None = _key("time/fit_s", NUMBER, SUCCESS)
    epochs: int | None = _key(None, INTEGER, SUCCESS)
    steps: int | None = _key(None, INTEGER, SUCCESS)
    warnings: list[str] | None = _key(None, STRINGS, SUCCESS)
    # test figures (absent with test=false; teacher and fidelity figures only with a teacher)
    student_acc: float | None = _key("student/acc", NUMBER)
    student_acc_best: float | None = _key("student/acc_best", NUMBER)
    student_best_ckpt: str | None = _key("student/best_ckpt", TEXT)
    student_ece: float | None = _key("student/ece", NUMBER)
    # a task's own scores (GLUE: Matthews correlation for CoLA, F1 for MRPC and QQP), last and best
    student_mcc: float | None = _key("student/mcc", NUMBER)
    student_mcc_best: float | None = _key("student/mcc_best", NUMBER)
    student_f1: float | None = _key("student/f1", NUMBER)
    student_f1_best: float | None = _key("student/f1_best", NUMBER)
    # the method's pre-training phase (kdx.pipeline.pretrain), when it had one
    init_epochs: int | None = _key("init/epochs", INTEGER)
    init_lr: float | None = _key("init/lr", NUMBER)
    teacher_acc: float | None = _key("teacher/acc", NUMBER)
    teacher_ece: float | None = _key("teacher/ece", NUMBER)
    fidelity_agreement: float | None = _key("fidelity/agreement", NUMBER)
    fidelity_kl: float | None = _key("fidelity/kl", NUMBER)
    fidelity_kernel_gap: float | None = _key("fidelity/kernel_gap", NUMBER)
    fidelity_cka: float | None = _key("fidelity/cka", NUMBER)
    # the same figures measured on the checkpoint the monitor picked (``student/best_ckpt``), beside
    # the last epoch's above: the pair that belongs with ``student/acc_best``
    fidelity_agreement_best: float | None = _key("fidelity/agreement_best", NUMBER)
    fidelity_kl_best: float | None = _key("fidelity/kl_best", NUMBER)
    fidelity_kernel_gap_best: float | None = _key("fidelity/kernel_gap_best", NUMBER)
    fidelity_cka_best: float | None = _key("fidelity/cka_best", NUMBER)
    student_ece_best: float | None = _key("student/ece_best", NUMBER)
    # causal language models: held-out perplexity (last and best checkpoint; the teacher's)
    student_ppl: float | None = _key("student/ppl", NUMBER)
    student_ppl_best: float | None = _key("student/ppl_best", NUMBER)
    teacher_ppl: float | None = _key("teacher/ppl", NUMBER)
    train_samples_per_s: float | None = _key("throughput/train_samples_per_s", NUMBER)
    # where the teacher came from
    teacher_sha256: str | None = _key("teacher/sha256", TEXT, SUCCESS)
    teacher_name: str | None = _key("teacher/name", TEXT)
    teacher_source: str | None = _key("teacher/source", TEXT)
    teacher_ckpt: str | None = _key("teacher/ckpt", TEXT)
    teacher_val_acc: float | None = _key("teacher/val_acc", NUMBER)
    teacher_retrained_because: str | None = _key("teacher/retrained_because", TEXT)
    # what the run read: examples per split (after the data's own checks), the teacher-output cache
    data_examples: dict[str, Any] | None = _key("data/examples", MAPPING, what="a mapping of split -> count")
    # how the training batches were formed, where the data module chose (text: length_grouped | shuffled)
    data_batching: str | None = _key("data/batching", TEXT)
    teacher_cache_status: str | None = _key("teacher_cache/status", TEXT)
    teacher_cache_problem: str | None = _key("teacher_cache/problem", TEXT)
    # teacher.cache=topk: stored bytes per token and KL(full teacher ‖ its reconstruction), per position
    teacher_cache_bytes_per_token: int | None = _key("teacher_cache/bytes_per_token", INTEGER)
    teacher_cache_topk_kl: float | None = _key("teacher_cache/topk_kl", NUMBER)
    # a run continued from a checkpoint: that checkpoint
    resumed_from: str | None = _key(None, TEXT)
    # a run stopped by a signal (status: interrupted): which, the checkpoint and the command to resume
    interrupt_signal: str | None = _key("interrupt/signal", TEXT)
    interrupt_ckpt: str | None = _key("interrupt/ckpt", TEXT)
    interrupt_resume: str | None = _key("interrupt/resume", TEXT)
    # a run that did not succeed
    error: str | None = _key(None, TEXT, FAILURE)
    error_type: str | None = _key(None, TEXT, FAILURE)
    log: str | None = _key(None, TEXT, FAILURE)
    # figures whose keys are not known ahead (callback reports such as diag/*), by metrics.json key
    extra: dict[str, Any] = field(default_factory=dict, metadata={"key": None, "extra": True})

    def __post_init__(self) -> None:
        if self.status is None:
            raise RecordError("no 'status' (kdx-train writes ok, failed, ...)")
        for f, key in _FIELD_KEYS.items():
            _check(key, getattr(self, f.name), f.metadata)
        if self.status in FINISHED:  # only a run that failed on its seed records one that is not an integer
            _check("seed", self.seed, {"types": int, "what": "an integer"})
        if not isinstance(self.extra, dict):
            raise RecordError(f"'extra' should be a mapping, not {type(self.extra).__name__}")
        clash = sorted(set(self.extra) & _RESERVED)
        if clash:
            raise RecordError(f"extra keys {clash} are record fields; set the fields instead")

    # -- metrics.json keys ----------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """The record of a parsed metrics.json, versioned or not; :class:`RecordError` says why not."""
        if not isinstance(data, Mapping):
            raise RecordError(f"a JSON object is expected, found {type(data).__name__}")
        if data.get("status") is None:
            raise RecordError("no 'status' (kdx-train writes ok, failed, ...)")
        version = data.get("schema_version")
        if version is not None:
            if isinstance(version, bool) or not isinstance(version, int):
                raise RecordError(f"'schema_version' should be an integer, not {version!r:.60}")
            if version > SCHEMA_VERSION:
                raise RecordError(
                    f"schema_version {version} is newer than this kdx reads ({SCHEMA_VERSION}); upgrade kdx"
                )
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            name = _FIELD_OF_KEY.get(key)
            if name is not None:
                values[name] = _copy(value)
            elif key != "schema_version":
                extra[key] = value
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The metrics.json keys: every field its outcome always writes (null when unknown), every
        other field that holds a value, the extra figures, and ``schema_version``."""
        outcomes = {OK: (SUCCESS,), NO_LEARNING: (SUCCESS, FAILURE)}.get(self.status, (FAILURE,))
        out: dict[str, Any] = {}
        for f, key in _FIELD_KEYS.items():
            value = getattr(self, f.name)
            if value is not None or f.metadata["always"] in (EVERY, *outcomes):
                out[key] = _copy(value)
        out.update(self.extra)
        out["schema_version"] = SCHEMA_VERSION
        return out

    def get(self, key: str, default: Any = None) -> Any:
        """The value of metrics.json ``key`` (``"student/acc"``, ``"diag/sim_corr"``); ``default``
        when the record has none."""
        if key == "schema_version":
            return SCHEMA_VERSION
        name = _FIELD_OF_KEY.get(key)
        value = getattr(self, name) if name is not None else self.extra.get(key)
        return default if value is None else value

    def merged(self, values: Mapping[str, Any]) -> RunRecord:
        """A copy with ``values`` (by metrics.json key) set over this record's, checked the same way."""
        return type(self).from_dict({**self.to_dict(), **values})

    # -- what readers show ----------------------------------------------------------------------

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def finished(self) -> bool:
        """The run ran to its end and its figures stand (``ok``, or ``no_learning``: at chance)."""
        return self.status in FINISHED

    @property
    def name(self) -> str:
        """What a person calls the run: its label, else its method."""
        return str(self.label or self.method or "?")

    def title(self) -> str:
        """``kd · cnn1d → mlp on mnist1d · seed 0``."""
        return f"{self.name} · {self.teacher} → {self.student} on {self.dataset} · seed {self.seed}"

    def figure_problems(self) -> list[tuple[str, str]]:
        """(metrics.json key, what is wrong) for every figure of :data:`RANGES` the record holds
        that is not a finite number in its range (accuracy 7.5, a NaN KL); empty when all are sound."""
        problems = []
        for key, (low, high) in RANGES.items():
            value = self.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append((key, f"{value!r:.40} is not a number"))
            elif not math.isfinite(value):
                problems.append((key, f"{value} is not finite"))
            elif not low <= value <= high:
                problems.append((key, f"{value:g} is outside [{low:g}, {high:g}]"))
        return problems

    def debug_reason(self) -> str | None:
        """Why this run is a debug run, or None: its config or group choices set ``debug``,
        or its config ``trainer.fast_dev_run``,
        or a ``trainer.limit_*_batches`` that is a fraction below 1 or a batch count (an int)."""
        config = self.config or {}
        for where in (config, self.choices or {}):
            if where.get("debug") not in (None, False, "", "none", "null"):
                return f"debug={where['debug']}"
        trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
        if trainer.get("fast_dev_run") not in (None, False, 0):
            return f"trainer.fast_dev_run={trainer['fast_dev_run']}"
        for key in sorted(trainer):
            value = trainer[key]
            if not (key.startswith("limit_") and key.endswith("_batches")) or value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, int) or value < 1.0:
                return f"trainer.{key}={value}"
        return None

    def summary_rows(self) -> list[tuple[str, str]]:
        """(metrics.json key, formatted value) for the end-of-run summary: accuracies, agreement
        and ECE in percent, the other figures to 4 significant digits, then the teacher's origin."""
        rows = [(key, f"{100 * v:.2f} %") for key in SUMMARY_PERCENT if (v := self.get(key)) is not None]
        rows += [(key, f"{v:.4g}") for key in SUMMARY_PLAIN if (v := self.get(key)) is not None]
        if self.teacher_source:
            rows.append(("teacher", f"{self.teacher_source}: {self.teacher_ckpt}"))
        return rows


# figures that are fractions in [0, 1] or non-negative numbers: kdx-table refuses a record whose
# figures fall outside (a NaN, an accuracy of 7.5 or 75)
_UNIT = (0.0, 1.0)
_NON_NEGATIVE = (0.0, math.inf)
RANGES: dict[str, tuple[float, float]] = {
    **dict.fromkeys(
        (
            "student/acc",
            "student/acc_best",
            "student/val_acc_best",
            "teacher/acc",
            "teacher/val_acc",
            "fidelity/agreement",
            "fidelity/agreement_best",
            "student/ece",
            "student/ece_best",
            "teacher/ece",
        ),
        _UNIT,
    ),
    **dict.fromkeys(("fidelity/cka", "fidelity/cka_best"), (-1e-6, 1.0 + 1e-6)),
    **dict.fromkeys(
        (
            "fidelity/kl",
            "fidelity/kl_best",
            "fidelity/kernel_gap",
            "fidelity/kernel_gap_best",
            "time/fit_s",
            "throughput/train_samples_per_s",
        ),
        _NON_NEGATIVE,
    ),
    "monitor/best": (-math.inf, math.inf),
}

SUMMARY_PERCENT = (
    "student/acc",
    "student/acc_best",
    "teacher/acc",
    "fidelity/agreement",
    "fidelity/agreement_best",
    "student/ece",
    "student/ece_best",
    "teacher/ece",
)
SUMMARY_PLAIN = (
    "fidelity/kl",
    "fidelity/kl_best",
    "fidelity/kernel_gap",
    "fidelity/cka",
    "time/fit_s",
    "throughput/train_samples_per_s",
)

_FIELD_KEYS: dict[dataclasses.Field, str] = {
    f: f.metadata["key"] or f.name for f in dataclasses.fields(RunRecord) if not f.metadata.get("extra")
}
_FIELD_OF_KEY: dict[str, str] = {key: f.name for f, key in _FIELD_KEYS.items()}
# the keys extra may not hold: a field's key, or the version the writer stamps
_RESERVED = frozenset(_FIELD_OF_KEY) | {"schema_version"}


def _check(key: str, value: Any, metadata: Mapping[str, Any]) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, metadata["types"])):
        raise RecordError(f"'{key}' should be {metadata['what']}, not {type(value).__name__} {value!r:.60}")


def _copy(value: Any) -> Any:
    """A container of the record is its own: editing a record never edits the mapping it came from."""
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    return value


# -- files ----------------------------------------------------------------------------------------


def record_file(path: str | os.PathLike) -> Path:
    """The record file of ``path``: ``path`` itself when it names a ``.json`` file, else the
    metrics.json inside the run folder ``path``."""
    path = Path(path)
    return path if path.suffix == ".json" else path / RECORD_NAME


def read_record(path: str | os.PathLike) -> RunRecord:
    """The record in ``path`` (a metrics.json, or a run folder holding one).

    A file that cannot be opened raises its ``OSError``; one that is not a run record (not UTF-8,
    not JSON, not a record) raises :class:`RecordError` naming it."""
    file = record_file(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"{type(err).__name__}: {err}", file) from err
    try:
        return RunRecord.from_dict(data)
    except RecordError as err:
        raise RecordError(err.reason, file) from None


def write_record(path: str | os.PathLike, record: RunRecord) -> Path:
    """Write ``record`` to ``path`` (a metrics.json, or a run folder) atomically, as strict JSON:
    a NaN or infinite figure is written as null."""
    return atomic_write_json(record_file(path), record.to_dict())
