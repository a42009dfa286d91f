"""Errors the user can act on: what they gave (a recipe, a data source, a tokenizer, a config value) or what
the run met (a diverged loss, a full disk).

Command-line entry points print these as one line naming the culprit, without a traceback.
"""


class InputError(ValueError):
    """Input that cannot be used; the message names the key, file or source at fault."""
