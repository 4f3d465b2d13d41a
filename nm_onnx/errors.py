"""User-facing errors.

Every problem a user can fix (bad path, unknown alias, malformed recipe, missing op library...) is
raised as a `NmOnnxError` with a one-line, actionable message. The CLI prints it and exits with 2;
anything else is a bug and keeps its traceback.
"""


class NmOnnxError(Exception):
    """An error the user can fix; the message says how."""
