"""Exception types of pscnn.

Every error pscnn raises on bad input derives from :class:`PscnnError`, and its
message is one line that names the offending thing (a file, a parameter, a
field) and what is wrong with it, so a CLI can print ``str(err)`` and exit.
"""


class PscnnError(Exception):
    """Base class of every error pscnn raises on bad input or state."""


class SpecError(PscnnError, ValueError):
    """A model spec (preset name, dict or JSON) cannot be built."""


class ShapeError(PscnnError, ValueError):
    """An array has the wrong shape or dtype for where it is used (or NaN/Inf where values must be finite)."""


class DataError(PscnnError, OSError):
    """A dataset file is missing, truncated, corrupt or of the wrong kind."""


class CheckpointError(PscnnError, OSError):
    """A checkpoint cannot be read, or does not match the model/optimizer."""


class ConfigError(PscnnError, ValueError):
    """An optimizer, schedule or run configuration is invalid."""
