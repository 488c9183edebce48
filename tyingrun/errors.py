"""The one exception type for bad input: the CLI prints its message as one line and exits 2."""


class BadInput(Exception):
    """A user-fixable problem (config, data, checkpoint). The message says what is wrong and how to fix it."""
