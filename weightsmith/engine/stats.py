"""Input statistics of a linear layer, written once and shared by every layer reading that input."""
from __future__ import annotations

import torch

from ..errors import NumericalError, WeightsmithError
from ..quant.registry import LayerStats

BAND = 4  # XᵀX is symmetric: only the upper row bands are multiplied (~5/8 of a full product)


class HessianStats:
    """Accumulates ``H = XᵀX / N`` (float32) over the rows of the inputs it is given, and with
    ``float_path`` also ``dXX = (X̃ − X)ᵀX / N`` from the float-path inputs ``X̃`` of the same rows
    (over the rows that have one when the float path runs on a subset of the samples; see :class:`~weightsmith.quant.registry.LayerStats`).

    ``H`` is symmetric: only its upper triangle is accumulated, in ``BAND`` row bands (band ``i``
    times the columns from ``i`` on), ~(BAND+1)/(2·BAND) of the multiply-adds of a full ``XᵀX``;
    the lower triangle is mirrored once in :meth:`finalize`. ``dXX`` is not symmetric.
    """

    def __init__(self, dim: int, device: torch.device, float_path: bool = False, full: bool = True):
        self.full = full  # False: only the per-channel sums of squares (the norms a step like Wanda needs), no XᵀX
        self.h = torch.zeros(dim, dim, dtype=torch.float32, device=device) if full else torch.zeros(dim, dtype=torch.float32, device=device)
        self.dxx = torch.zeros(dim, dim, dtype=torch.float32, device=device) if float_path else None
        self.n = 0
        self.nd = 0  # rows that came with a float-path input
        step = max(128, -(-dim // BAND))
        self._bands = [(a, min(a + step, dim)) for a in range(0, dim, step)]

    def add(self, x: torch.Tensor, xt: torch.Tensor | None = None) -> None:
        """Add rows ``x`` to ``H``; with ``xt`` (their float-path inputs) to ``dXX`` as well. Rows
        without ``xt`` (a float path carried on a subset of the samples) count for ``H`` only;
        ``dXX`` is then the mean over the rows that had one."""
        x = x.reshape(-1, x.shape[-1]).float()
        if xt is not None:
            if self.dxx is None:
                raise WeightsmithError("float-path input given to statistics that do not carry the float path")
            if xt.numel() != x.numel():
                raise WeightsmithError("the float-path input has another shape than the quantized-path input")
            d = xt.reshape(-1, x.shape[-1]).float() - x
            self.dxx.addmm_(d.t(), x)
            self.nd += x.shape[0]
            del d
        if not self.full:
            self.h.add_((x * x).sum(0))
            self.n += x.shape[0]
            return
        x_t = x.t()
        for a, b in self._bands:
            self.h[a:b, a:].addmm_(x_t[a:b], x[:, a:])
        self.n += x.shape[0]

    def finalize(self, where: str, reduce=None) -> torch.Tensor:
        if reduce is not None:  # data-parallel calibration: sum the partial statistics of all ranks
            self.h, self.n = reduce(self.h, self.n)
        if self.n == 0:
            raise NumericalError(f"no calibration input reached {where}")
        if not self.full:
            sq = self.h / self.n
            if not torch.isfinite(sq).all():
                raise NumericalError(f"NaN/Inf in the calibration activations reaching {where}")
            return sq
        h = (torch.triu(self.h) + torch.triu(self.h, 1).t()) / self.n
        if not torch.isfinite(h).all():
            raise NumericalError(f"NaN/Inf in the calibration activations reaching {where}")
        return h

    def layer_stats(self, where: str, reduce=None) -> LayerStats:
        h = self.finalize(where, reduce)
        dxx = None
        if self.dxx is not None:
            if reduce is not None:  # every rank carries the float path when one does: the collectives line up
                self.dxx, self.nd = reduce(self.dxx, self.nd)
            if self.nd == 0:
                raise NumericalError(f"no float-path input reached {where}")
            dxx = self.dxx / self.nd
            if not torch.isfinite(dxx).all():
                raise NumericalError(f"NaN/Inf in the float-path activations reaching {where}")
        if not self.full:
            return LayerStats(None, self.n, dxx, h.clamp(min=0).sqrt())
        return LayerStats(h, self.n, dxx, torch.diag(h).clamp(min=0).sqrt())
