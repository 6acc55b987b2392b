"""User-facing errors.

Anything a user can cause (a bad path, an unknown key, a wrong shape, a corrupt file) raises
:class:`DinokitError` with one line that names the problem and the fix. The CLI prints it as
``error: <message>`` and exits with status 2, without a traceback.
"""


class DinokitError(Exception):
    """An error caused by user input; its message is a complete one-line explanation."""


class ProcessSpecificError(DinokitError):
    """A user error that only some processes of a ``torchrun``/SLURM run hit (e.g. a process without its GPU):
    printed by every process that hits it, even before the process group starts (other user errors are then
    printed once per node, since every process reads the same arguments)."""


class TrainingHealthWarning(UserWarning):
    """A training run that goes on but shows a sign of failure (e.g. collapsed heads); the text says what to try."""
