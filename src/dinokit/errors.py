"""User-facing errors.

Anything a user can cause (a bad path, an unknown key, a wrong shape, a corrupt file) raises
:class:`DinokitError` with one line that names the problem and the fix. The CLI prints it as
``error: <message>`` and exits with status 2, without a traceback.
"""


class DinokitError(Exception):
    """An error caused by user input; its message is a complete one-line explanation."""


class TrainingHealthWarning(UserWarning):
    """A training run that goes on but shows a sign of failure (e.g. collapsed heads); the text says what to try."""
