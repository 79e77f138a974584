"""The errors lcow raises.

One base class, :class:`LcowError`, and one subclass per category that a caller (the CLI,
the Docker plugin) maps to an answer. Each category also inherits the builtin exception that
fits it, so code that catches ``ValueError`` or ``FileNotFoundError`` keeps working.

Messages read "failed to <verb> <object> <id>: <cause>" and carry the offending value, the
limit it broke and, when the user can act, what to do.
"""


class LcowError(Exception):
    """Base class of every error lcow raises on purpose."""


class NotFoundError(LcowError, FileNotFoundError):
    """A layer, file or entry that the request names does not exist."""


class AlreadyExistsError(LcowError, FileExistsError):
    """The object that the request would create exists already."""


class InvalidArgumentError(LcowError, ValueError):
    """An argument or option has a value that lcow does not accept."""


class UnsupportedError(LcowError, NotImplementedError):
    """The input is valid but uses a feature lcow cannot represent."""


class FailedPreconditionError(LcowError, RuntimeError):
    """The store is not in a state that allows the request (for example, a layer in use)."""


class CorruptInputError(LcowError, ValueError):
    """Input data (a tar stream, an image, a disk) is malformed or truncated."""


class ServiceVMError(LcowError, RuntimeError):
    """A service VM failed, timed out or stopped answering."""
