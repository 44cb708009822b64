"""Provide a teacher: load its weights safely, or train and cache it (``ckpt: auto``).

* ``teacher.ckpt=<path>``: a plain ``state_dict``, a Lightning checkpoint (kdx's own, whose student
  or teacher weights are taken, or any whose keys match after a ``model.`` prefix), or
  RepDistiller's ``{'model': ...}`` files (:func:`kdx.models.weights.load_weights`).
* ``teacher.ckpt=auto``: the teacher is an ordinary kdx run of its own, trained by the pipeline's
  ``run`` that the caller hands in, and cached under a key of its recipe, model and data
  (:mod:`kdx.teacher.auto`, :mod:`kdx.teacher.key`).

Whether the teacher is good enough (``teacher.min_acc``) is the pipeline's teacher check
(:func:`kdx.pipeline.build.check_teacher`). Weights are always read with
``torch.load(..., weights_only=True)``. Any mismatch is one :class:`~kdx.errors.KDXError` line that
names the file and what did not fit.
"""

from kdx.models.weights import load_weights
from kdx.teacher.auto import RunFn, teacher_run_config, train_teacher
from kdx.teacher.key import DATA_KEY_EXCLUDED, cached_teacher_path, data_key, portable, teacher_key
from kdx.teacher.provide import provide_teacher

__all__ = [
    "DATA_KEY_EXCLUDED",
    "RunFn",
    "cached_teacher_path",
    "data_key",
    "load_weights",
    "portable",
    "provide_teacher",
    "teacher_key",
    "teacher_run_config",
    "train_teacher",
]
