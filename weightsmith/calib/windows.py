"""Random calibration windows cut from one long token stream (the GPTQ-style sampling protocol)."""
from __future__ import annotations

import torch

from ..errors import WeightsmithError


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` consecutive tokens from the 1-D ``ids``, shape (nsamples, seqlen).

    The protocol, exactly: ``g = torch.Generator().manual_seed(seed)``; for each window in turn
    ``i = torch.randint(0, n - seqlen - 1, (1,), generator=g).item()`` and the window is
    ``ids[i:i + seqlen]``.
    """
    if ids.dim() != 1:
        raise WeightsmithError(f"token ids must be 1-D, got shape {tuple(ids.shape)}")
    if nsamples < 1 or seqlen < 1:
        raise WeightsmithError(f"nsamples and seqlen must be positive (got {nsamples} and {seqlen})")
    n = ids.numel()
    if n < seqlen + 2:
        raise WeightsmithError(f"calibration text has {n} tokens, shorter than one window of {seqlen}")
    return torch.stack([ids[i : i + seqlen] for i in window_starts(n, nsamples, seqlen, seed)]).to(torch.long)


def window_starts(n: int, nsamples: int, seqlen: int, seed: int) -> list[int]:
    """The start of each window :func:`sample_windows` cuts from ``n`` tokens, in order."""
    g = torch.Generator().manual_seed(seed)
    return [int(torch.randint(0, n - seqlen - 1, (1,), generator=g).item()) for _ in range(nsamples)]
