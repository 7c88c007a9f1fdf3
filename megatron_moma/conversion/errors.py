"""The one error type of the checkpoint converters."""


class ConversionError(ValueError):
    """Bad input to a conversion: the message names the path (and iteration, key or flag) and
    says what was expected. The command-line tools print it and exit with code 1."""
