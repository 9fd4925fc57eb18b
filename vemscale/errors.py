"""Errors the user must act on. The CLI prints their message without a traceback and exits 2."""


class UserError(ValueError):
    """Bad input (path, dtype, shape, config, checkpoint): the message says what to fix."""
