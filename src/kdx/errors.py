"""The errors a user sees as a single line: bad input that names the problem and the fix.

Anything else that escapes a run is a bug: the run wrapper (:func:`kdx.pipeline.run.run_job`) prints its full
traceback to stderr and the run's log and exits 1, where a :class:`KDXError` exits 2 with one line.
"""


class KDXError(Exception):
    """A user error (configuration, files, shapes). Entry points print it as one line and exit 2."""

    status = "failed"
    """The ``status`` the run's metrics.json records."""


class HyperParameterError(KDXError, ValueError):
    """A method's hyper-parameter is out of range (raised from the method's ``__init__``)."""


class NonFiniteLossError(KDXError):
    """The loss became NaN or infinite; raised on every DDP rank at once, with the same message."""


class DatasetNotFoundError(KDXError, FileNotFoundError):
    """A data set's files are missing (or fail their checksum) and will not be downloaded."""


class StageNameError(KDXError, ValueError):
    """A stage / classifier name that the model does not have (the message lists the valid ones)."""


class DivergenceError(KDXError):
    """The training loss ran away (kdx.callbacks.DivergenceMonitor); the run records ``status: diverged``."""

    status = "diverged"


class NoLearningError(KDXError):
    """The student's validation accuracy never rose significantly above chance
    (kdx.callbacks.DivergenceMonitor). Not raised: the finished run records ``status: no_learning``
    with its figures and this message, and exits 2 like any user error."""

    status = "no_learning"


class NonFiniteSources:
    """What a non-finite training step is blamed on, and the one message for it.

    :class:`kdx.module.DistillationModule` keeps device-side sums of the loss, of the training
    inputs and of the teacher's logits next to its loss-term sums and reads them together in its
    NaN check (every ``nonfinite_check_every`` steps, reduced over the ranks: no host sync of their
    own, the same message on every rank). The sources found non-finite are named in :attr:`NAMES`
    order; the message blames the earliest cause: the inputs, then the teacher, then the loss.
    """

    NAMES = ("loss", "inputs", "teacher outputs")

    @staticmethod
    def message(sources: list[str], epoch: int, step: int) -> str:
        where = f"at epoch {epoch} (seen by global step {step}, on at least one device)"
        if "inputs" in sources:
            return (
                f"the training inputs hold NaN or infinite values {where}: the data, not the optimiser — "
                "check the data set's files and preprocessing (normalisation by a zero std?)"
            )
        if "teacher outputs" in sources:
            return (
                f"the teacher's outputs became NaN or infinite {where} on finite inputs: check the teacher's "
                "weights (teacher.ckpt) and its precision (trainer.precision)"
            )
        return (
            f"the training loss became NaN or infinite {where}; lower optim.optimizer.lr, set "
            "trainer.gradient_clip_val, or check the method's loss weights"
        )
