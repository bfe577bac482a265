"""weightsmith: compress the weights of trained transformers block by block, and measure the cost."""
__version__ = "0.1.0"

from .config import CalibConfig, GridConfig, QuantizeConfig, build_config, load_recipe  # noqa: E402
from .errors import WeightsmithError  # noqa: E402


def quantize(*args, **kwargs):
    """See :func:`weightsmith.api.quantize`."""
    from .api import quantize as _q

    return _q(*args, **kwargs)


def evaluate(*args, **kwargs):
    """See :func:`weightsmith.eval.evaluate`."""
    from .eval import evaluate as _e

    return _e(*args, **kwargs)


__all__ = ["CalibConfig", "GridConfig", "QuantizeConfig", "WeightsmithError", "build_config", "evaluate", "load_recipe", "quantize"]
