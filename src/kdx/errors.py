"""The errors a user sees as a single line: bad input that names the problem and the fix.

Anything else that escapes a run is a bug: the run wrapper (:func:`kdx.train.main`) prints its full
traceback to stderr and the run's log and exits 1, where a :class:`KDXError` exits 2 with one line.
"""


class KDXError(Exception):
    """A user error (configuration, files, shapes). Entry points print it as one line and exit 2."""


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
