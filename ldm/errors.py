"""The base class of errors a user fixes by changing an argument, a config value or a file.

Their messages name the key, file (and line) or path and say what to do, so ``ldm`` and
``python -m train.<stage>`` print the message alone (``error: ...``, exit status 2) instead of a
traceback. Everything else still raises with its traceback: that is a bug to report.
"""

from __future__ import annotations

import errno
import sys
from typing import Callable, TypeVar

T = TypeVar("T")
BAD_INPUT_STATUS = 2  # argparse's status for a bad argument: every bad input exits with it


class UserError(Exception):
    """Bad input: the message names it and the fix."""


def is_bad_input(err: BaseException) -> bool:
    """Errors whose message is the whole story: bad input, or a path that is missing, taken or unwritable."""
    return isinstance(err, (UserError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                            NotADirectoryError)) or (
        isinstance(err, OSError) and err.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT))


def run_reporting_bad_input(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)``; bad input (``is_bad_input``) exits with ``error: <message>`` on one line, status 2."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        if not is_bad_input(err):
            raise
        message = " ".join(str(err).split()) or type(err).__name__  # one line, whatever the message held
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(BAD_INPUT_STATUS) from err
