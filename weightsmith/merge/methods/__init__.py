"""The built-in merge methods; importing this package registers them (``merge/registry.py``)."""
from . import atlas, linear, model_stock, slerp, task_arithmetic, ties, dare, wise_ft  # noqa: F401
