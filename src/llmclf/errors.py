"""Errors a user can fix. The CLI prints their message in one line and exits non-zero."""


class LlmclfError(Exception):
    """Base class for expected, user-facing errors (bad input, missing files, bad options)."""


class ConfigError(LlmclfError):
    """A model or training configuration is invalid."""


class CheckpointError(LlmclfError):
    """A weights file or model directory cannot be read or does not fit the model."""


class TokenizerError(LlmclfError):
    """The tokenizer files are missing or unreadable."""


class DataError(LlmclfError):
    """Input data is missing, empty, too short or malformed."""
