"""The base class of errors a user fixes by changing an argument, a config value or a file.

Their messages name the key, file (and line) or path and say what to do, so ``ldm`` prints the
message alone (``error: ...``, exit status 2) instead of a traceback. Everything else still raises
with its traceback: that is a bug to report.
"""


class UserError(Exception):
    """Bad input: the message names it and the fix."""
