"""User-facing errors: a bad checkpoint, config or input. The CLI prints them as one line and exits 2."""


class UserError(ValueError):
    """Something the user can fix (a file, a value, a flag); the message names it."""


class ConfigError(UserError):
    """config.json is missing, malformed or describes a model we cannot run."""


class CheckpointError(UserError):
    """A shard, index entry or tensor is missing or has the wrong shape/dtype."""
