"""The one exception the quant package raises for user-facing problems (the CLI maps it to exit 2)."""


class QuantError(Exception):
    """A model dir or a request the W8A16 code refuses; the message is one line for stderr."""
