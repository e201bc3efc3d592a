"""Errors a user can cause and fix; the CLI prints them as one message, without a traceback."""


class UserError(Exception):
    """Base for errors whose message names the problem and the fix."""
