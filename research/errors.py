"""Every error a person (not a programmer) has to fix: the bottom floor, imported by every other one.

Entry points catch ``UserError`` (research/cli.py) and print its message as one ``error:`` line with
exit code 2; anything else is a bug and keeps its traceback. Each class says *what* is wrong, so
callers classify by type, never by matching words in a message.
"""

from __future__ import annotations

import errno

# an OS error that is the environment's, not a bug (full disk, read-only store): said in one line
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class UserError(Exception):
    """An input or environment problem; the message is one sentence with the fix in it."""


class ConfigError(UserError, ValueError):
    """A config value a person must fix; the message says how."""


class DataError(UserError, ValueError):
    """A problem with the user's style folder; the message says how to fix it."""


class ModelNotFoundError(UserError, RuntimeError):
    """The base model or a backbone cannot be loaded; the message names it and the fix."""


class BrokenModelError(ModelNotFoundError):
    """A local model file or folder exists but cannot be read: re-export it, downloading will not help.
    (A subclass, so every caller that reports an unloadable model reports this one too.)"""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (e.g. NaN loss); the message says what to change."""


class MissingWeightsError(UserError):
    """A metric backbone's weights are neither local nor downloadable; the message says which option fixes it."""


class ResumeError(ConfigError):
    """A resume that would not continue the run that ran (other flags, no state to resume from)."""


class BlendError(ConfigError):
    """Two adapters that cannot be blended, or a path that is not one; the message says what to pass."""


class ObjectiveError(ConfigError):
    """A search objective names a value the runs do not produce; the message lists the ones they do."""


class StageError(UserError, RuntimeError):
    """A study stage cannot start (its input is missing); the message says what to run first."""


class RunInterrupted(BaseException):
    """SIGINT/SIGTERM reached a run: a BaseException like KeyboardInterrupt, so `except Exception`
    in library code does not swallow it."""

    def __init__(self, signal_name: str, reason: str = ""):
        super().__init__(signal_name, reason)
        self.signal_name, self.reason = signal_name, reason


def is_user_error(err: BaseException) -> bool:
    """A person's to fix (one line, no traceback): a UserError or an OS error of the environment."""
    return isinstance(err, UserError) or (isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS)
