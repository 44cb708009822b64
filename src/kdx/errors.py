"""The one exception a user sees as a single line: bad input that names the problem and the fix."""


class KDXError(Exception):
    """A user error (configuration, files, shapes). Entry points print it as one line and exit 2."""
