"""Weight-space operations on whole checkpoints: merging N models tensor by tensor.

``merge(config, out)`` reads a mergekit-style configuration (``merge/config.py``), plans every
output tensor (``merge/plan.py``), runs a registered method on each (``merge/registry.py``,
``merge/methods/``) and writes the result atomically (``merge/driver.py``). ``continual_merge``
folds models in one at a time by orthogonal projection (``merge/continual.py``).
"""
from __future__ import annotations

from .config import MergeConfig, load_config
from .driver import merge
from .registry import Method, Param, TensorJob, register


def continual_merge(*args, **kwargs):
    """See :func:`weightsmith.merge.continual.continual_merge`."""
    from .continual import continual_merge as _c

    return _c(*args, **kwargs)


__all__ = ["MergeConfig", "Method", "Param", "TensorJob", "continual_merge", "load_config", "merge", "register"]
