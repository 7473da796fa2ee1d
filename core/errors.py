"""Errors a user can act on.

``UserError`` carries a message that names the problem *and* the fix. The command
line prints it as one line and exits with code 2; the studio shows it in a dialog.
Anything else that escapes is a bug and is reported with a traceback in the log.
"""


class UserError(Exception):
    """A problem with the user's input (path, file, setting, memory) and how to fix it."""


class UnsupportedModelError(UserError):
    """The model has no decoder blocks with plain ``nn.Linear`` projections we can quantize."""
