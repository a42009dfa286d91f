"""Errors the user can act on: what they gave (a recipe, a data source, a tokenizer, a config value) or what
the run met (a diverged loss, a full disk).

Command-line entry points print these as one line naming the culprit, without a traceback.
"""

import errno


class InputError(ValueError):
    """Input that cannot be used; the message names the key, file or source at fault."""


def user_message(error: BaseException) -> str | None:
    """The one line an entry point prints instead of a traceback for an error the user can act on (an InputError,
    a full disk), or None for any other error."""
    if isinstance(error, InputError):
        return f"error: {error}"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"error: disk full: {error}. Free some space and run it again"
    return None
