"""Typed exceptions for user errors.

Every error a user can cause derives from :class:`NDError`; the CLI prints its message as one line
and exits non-zero, without a traceback. Messages say what was wrong and how to fix it, and name
the Python parameters at fault as the API spells them (``ratio``, ``force=True``), never a CLI flag:
the CLI writes each parameter in :attr:`NDError.params` as its flag when it prints the message.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "NDError",
    "UnknownModelError",
    "ModelSourceError",
    "NothingToGateError",
    "UntraceableModelError",
    "InputShapeError",
    "CheckpointMismatchError",
    "DataError",
    "UnknownDataSourceError",
    "ConfigError",
    "RunDirError",
    "TrainingError",
    "UnknownAttackError",
    "AttackArgumentError",
    "UnknownDetectorError",
    "DetectionError",
    "StatsMismatchError",
    "ExportError",
]


class NDError(Exception):
    """Base class of every nd-plugin user error.

    Args:
        *args: the message (as for any exception).
        params: the Python parameters that the message names (``"ratio"``, ``"force"``): where the
            error reaches a user through the CLI, each is shown as the command's flag for it.

    Example:
        >>> err = ConfigError("ratio must be in [0, 1), got 1.5.", params=("ratio",))
        >>> str(err), err.params
        ('ratio must be in [0, 1), got 1.5.', ('ratio',))
    """

    def __init__(self, *args: object, params: Sequence[str] = ()) -> None:
        super().__init__(*args)
        self.params = tuple(params)


class UnknownModelError(NDError, KeyError):
    """A model name that the registry cannot resolve (unknown or ambiguous)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelSourceError(NDError, ValueError):
    """A model source that cannot give a model: a ``module:`` spec that does not import or names no
    callable, a factory that returns no ``nn.Module``, a name registered twice."""


class NothingToGateError(NDError, ValueError):
    """The model has no convolution that can carry a gate."""


class UntraceableModelError(NDError, RuntimeError):
    """torch-pruning's graph tracing cannot follow the model (the message names the layer)."""


class InputShapeError(NDError, ValueError):
    """``example_inputs`` (or data) of a shape the model cannot take."""


class CheckpointMismatchError(NDError, ValueError):
    """A checkpoint written for another architecture or number of classes."""


class DataError(NDError, ValueError):
    """A data set that is missing, empty, or does not fit the run."""


class UnknownDataSourceError(DataError):
    """A data spec whose scheme no data source is registered for (the message lists the registered ones)."""


class ConfigError(NDError, ValueError):
    """An option outside its valid range (ratio, lambda, device, ...)."""


class RunDirError(NDError, ValueError):
    """A run directory that lacks what a command needs, or belongs to another run."""


class TrainingError(NDError, RuntimeError):
    """Training stopped (for example on a non-finite loss); the last good checkpoint is kept."""


class UnknownAttackError(NDError, ValueError):
    """An attack name that ``nd_plugin.detect`` does not know (the message lists the known ones)."""


class AttackArgumentError(ConfigError):
    """A parameter that an attack does not take, or a value of the wrong type for it.

    Attributes:
        parameter: the parameter's name (the message names it too, and lists the attack's parameters).
    """

    def __init__(self, message: str, parameter: str | None = None) -> None:
        super().__init__(message)
        self.parameter = parameter


class UnknownDetectorError(ConfigError):
    """A detector name that the detector registry does not hold (the message lists the registered ones)."""


class DetectionError(NDError, RuntimeError):
    """Detection cannot be measured (no correctly classified input, no successful attack, ...)."""


class StatsMismatchError(NDError, ValueError):
    """Path statistics that were collected on another model (other gated layers or widths)."""


class ExportError(NDError, RuntimeError):
    """An export that cannot be written (directory not empty) or that failed its own check."""
