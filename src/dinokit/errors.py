"""User-facing errors.

Anything a user can cause (a bad path, an unknown key, a wrong shape, a corrupt file) raises
:class:`DinokitError` with one line that names the problem and the fix. The CLI prints it as
``error: <message>`` and exits with status 2, without a traceback.
"""


class DinokitError(Exception):
    """An error caused by user input; its message is a complete one-line explanation.

    Raised in a DataLoader worker, torch re-raises it in the main process with the worker's whole traceback as
    the message ("Caught DinokitError in DataLoader worker process 0. Original Traceback ..."); that text is
    unwrapped here back to the original one line, so that the CLI prints it as it prints any other.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_unwrap_worker_message(args[0], type(self)),)
        super().__init__(*args)


def _unwrap_worker_message(message: str, cls: type) -> str:
    """The original message inside torch's re-raised worker exception text (any other text unchanged)."""
    if not (message.startswith("Caught ") and "\nOriginal Traceback" in message):
        return message
    marker = f"\n{cls.__module__}.{cls.__qualname__}: "
    start = message.rfind(marker)
    return message[start + len(marker):].strip() if start >= 0 else message


class ProcessSpecificError(DinokitError):
    """A user error that only some processes of a ``torchrun``/SLURM run hit (e.g. a process without its GPU):
    printed by every process that hits it, even before the process group starts (other user errors are then
    printed once per node, since every process reads the same arguments)."""


class RelayedError(DinokitError):
    """A user error that the main process found and sent to the others so that every process stops at once: printed
    by the main process only."""


class ModelInputError(DinokitError, ValueError):
    """A setting or an input a backbone cannot use: one line naming it and the fix (a ``ValueError`` too, as the
    model's errors were before)."""


class TrainingHealthWarning(UserWarning):
    """A training run that goes on but shows a sign of failure (e.g. collapsed heads); the text says what to try."""
