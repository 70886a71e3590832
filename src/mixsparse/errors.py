"""User-facing errors.

Every problem a user can cause (bad sparsity, bad N:M pattern, unknown pruner, missing model, short
corpus, ...) is raised as a :class:`MixsparseError` subclass with a message that names the offending
value, so the CLI can print one line instead of a traceback from deep inside torch.
"""


class MixsparseError(Exception):
    """Base class of every error caused by user input or user data."""


class ConfigError(MixsparseError, ValueError):
    """A configuration value (CLI flag, YAML key, API argument) is invalid."""


class SparsityError(ConfigError):
    """A sparsity, N:M pattern or per-layer sparsity map is invalid."""


class UnknownNameError(ConfigError, KeyError):
    """A pruner, allocation method, layer or architecture name is not known."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ModelLoadError(MixsparseError):
    """A model directory/id/checkpoint is missing, corrupt or refused."""


class DataError(MixsparseError):
    """A corpus is missing, empty or too short for the requested samples."""


class NumericalError(MixsparseError):
    """NaN/Inf in activations or a Hessian that no dampening could repair."""
