"""The one exception type users see: a clear, one-line message and a non-zero exit from the CLI."""


class WeightsmithError(Exception):
    """Bad input or an impossible request. The CLI prints ``error: <message>`` and exits with 2."""


class NumericalError(WeightsmithError):
    """NaN/Inf met in weights or activations."""
