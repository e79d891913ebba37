"""User-facing errors.

A `CtxawareError` carries one line that says what was wrong and what to do. The CLI prints it
without a traceback (unless ``--debug``) and exits with code 2.
"""


class CtxawareError(Exception):
    """Bad input or an impossible request, explained in one line."""
