"""The exception the quant package raises for user-facing problems."""

from pipeline.errors import ConfigError


class QuantError(ConfigError):
    """A model dir or a request the W8A16 code refuses: a ConfigError (exit code 2), its message one
    line for stderr."""
