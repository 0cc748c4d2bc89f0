"""User-facing errors: the CLI prints the message on one line and exits with code 2."""


class QwenExportError(Exception):
    """A problem with the user's input (checkpoint, config, output path); message says how to fix it."""


class CheckpointError(QwenExportError):
    """A checkpoint file or tensor is missing, extra or mis-shaped."""


class ConfigError(QwenExportError):
    """config.json is missing, malformed, or describes a model outside the supported family."""
