"""Input statistics of a linear layer, written once and shared by every layer reading that input."""
from __future__ import annotations

import torch

from ..errors import NumericalError


class HessianStats:
    """Accumulates ``H = XᵀX / N`` (float32) over the rows of the inputs it is given."""

    def __init__(self, dim: int, device: torch.device):
        self.h = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.h.addmm_(x.t(), x)
        self.n += x.shape[0]

    def finalize(self, where: str) -> torch.Tensor:
        if self.n == 0:
            raise NumericalError(f"no calibration input reached {where}")
        h = self.h / self.n
        if not torch.isfinite(h).all():
            raise NumericalError(f"NaN/Inf in the calibration activations reaching {where}")
        return h
