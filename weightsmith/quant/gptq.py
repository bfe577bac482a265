"""GPTQ: column-by-column rounding with second-order error compensation — and the solver core that
the GPTQ family (GPTAQ, FOEM, ResComp and their combinations) extends.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (arXiv:2210.17323). Written from the paper's algorithm:
with ``H = XᵀX/N`` and ``U`` the upper Cholesky factor of ``H⁻¹``, column ``j`` is rounded and
its error ``(w_j - q_j) / U_jj`` is pushed onto the not-yet-rounded columns through ``U_j,:``;
updates are applied lazily, ``block_size`` columns at a time.

Additions over the plain algorithm:
- dead inputs (``H_jj = 0``) get a unit diagonal and a zero weight column;
- damping starts at ``damp · mean(diag H)`` and escalates ×10 when the Cholesky factorisation
  fails; when even ``damp = 1`` fails, the layer falls back to round-to-nearest and says so;
- act-order (columns by descending ``H_jj``) with static groups (scales from the original
  weights, in natural column order) or dynamic groups (scales from the updated weights, in
  quantization order); ``g_idx`` records the group of every column, so any order and any group
  size — also one that does not divide the width — is expressible.

Extension points of the solver (:func:`gptq_quantize`, all in quantization order):
- ``error(w, q, w0, d)``: the error pushed through ``U`` after column ``i`` is rounded (GPTQ:
  ``(w - q)/d``; FOEM subtracts a first-order drift term), with ``w`` the column's compensated
  (latent) value, ``q`` its rounding, ``w0`` its original value and ``d = U_ii``;
- :class:`Term`\\ s: after column ``i`` is rounded, every later column ``j`` moves by
  ``M[i, j] · c_i`` with ``M`` strictly upper triangular and ``c_i = coef(v_i, w0_i)``, where
  ``v_i`` is the column's *residual source* — its latent value clamped to its group's grid range
  (``"latent"``), or its rounded value (``"rounded"``, the low-bit variant). GPTAQ and ResComp
  are such terms. Terms are applied lazily like the GPTQ update, so the result does not depend on
  ``block_size``.

The family's one config, :class:`GPTQConfig`, selects the terms by its ``name``: ``gptq``,
``gptaq``, ``foem``, ``rescomp`` or ``gptaq+foem`` (any order of the parts is accepted and
canonicalised; invalid combinations raise a :class:`WeightsmithError` saying why). Method options
(``gptaq_alpha``, ``foem_beta``, ``rescomp_alpha``, ``residual``) are None by default and filled
with the method's default when its name includes the part; an option for a part the name lacks
is an error. CLI: ``--method gptaq+foem``; YAML: ``method: {name: gptaq+foem, foem_beta: 0.2}``;
Python: ``{"method": {"name": "gptaq+foem"}}`` or ``GPTQConfig(name="gptaq+foem")``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import torch
from pydantic import Field, model_serializer, model_validator

from ..config import GridConfig, Strict
from ..errors import WeightsmithError
from . import grid as G
from .registry import LayerStats, QuantResult, register, register_family
from .rtn import rtn_quantize

# the family: registry key -> the extensions it applies, in this order
FAMILY: dict[str, tuple[str, ...]] = {
    "gptq": (),
    "gptaq": ("gptaq",),
    "foem": ("foem",),
    "rescomp": ("gptaq", "rescomp"),  # ResComp = GPTAQ's asymmetric term + the compensation-aware error
    "gptaq+foem": ("gptaq", "foem"),
}
FLOAT_PATH_PARTS = {"gptaq", "rescomp"}
PART_ORDER = ("gptaq", "rescomp", "foem")
DEFAULTS = {"gptaq_alpha": 0.25, "foem_beta": 0.2, "rescomp_alpha": 0.25}
OPTION_PART = {"gptaq_alpha": "gptaq", "foem_beta": "foem", "rescomp_alpha": "rescomp"}


def canonical_family_name(parts: list[str]) -> str:
    """``parts`` of a ``+``-joined name → the family's registry key, or a WeightsmithError saying why."""
    s = set(parts)
    if len(s) != len(parts):
        raise WeightsmithError(f"method {'+'.join(parts)!r} names a part twice")
    s.discard("gptq")  # 'gptq+foem' = 'foem': every member is GPTQ plus its terms
    if {"rescomp", "foem"} <= s:
        raise WeightsmithError("rescomp+foem is not a valid method: ResComp's compensation-aware error already contains FOEM's "
                               "first-order drift term (without a float path the two are the same term); use one of them")
    if "rescomp" in s:
        s.discard("gptaq")  # ResComp is GPTAQ's term plus its own: 'gptaq+rescomp' = 'rescomp'
    key = "+".join(p for p in PART_ORDER if p in s) or "gptq"
    if key not in FAMILY:
        raise WeightsmithError(f"method {'+'.join(parts)!r} is not a GPTQ-family combination; valid: {', '.join(FAMILY)}")
    return key


class GPTQConfig(Strict):
    """The GPTQ family's config; ``name`` picks the extensions (see the module docstring)."""

    name: Literal["gptq", "gptaq", "foem", "rescomp", "gptaq+foem"] = "gptq"
    act_order: bool = Field(True, description="quantize columns by descending Hessian diagonal")
    static_groups: bool = Field(True, description="group scales from the original weights (else from updated ones)")
    damp: float = Field(0.01, gt=0.0, le=1.0, description="initial damping, a fraction of mean(diag H)")
    block_size: int = Field(128, ge=1, description="columns per lazy update block")
    gptaq_alpha: Optional[float] = Field(None, ge=0.0, le=1.0, description="GPTAQ/ResComp: weight of the asymmetric (float-path) term (default 0.25)")
    foem_beta: Optional[float] = Field(None, ge=0.0, le=1.0, description="FOEM: weight of the first-order drift term (default 0.2)")
    rescomp_alpha: Optional[float] = Field(None, ge=0.0, le=1.0, description="ResComp: weight of the compensation-aware error (default 0.25)")
    float_samples: Optional[int] = Field(None, ge=1, description="GPTAQ/ResComp: calibration samples that also run through the float "
                                         "model, rounded up to whole chunks (default: all); dXX is estimated on them, H on all")
    residual: Literal["auto", "latent", "rounded"] = Field(
        "auto", description="GPTAQ/ResComp terms use each column's latent value clamped to its grid range, or its rounded value; auto = rounded at 2 bits")

    @model_validator(mode="before")
    @classmethod
    def _family(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        name = data.get("name", "gptq")
        if isinstance(name, str) and name not in FAMILY:
            name = canonical_family_name([p.strip() for p in name.split("+")])
        data["name"] = name
        parts = set(FAMILY.get(name, ())) | ({"rescomp"} if name == "rescomp" else set())
        for opt, part in OPTION_PART.items():
            if data.get(opt) is None:
                data[opt] = DEFAULTS[opt] if part in parts else None
            elif part not in parts:
                raise ValueError(f"{opt} applies to methods with {part} in their name, not to {name!r}")
        if data.get("float_samples") is not None and not parts & FLOAT_PATH_PARTS:
            raise ValueError(f"float_samples applies to methods with a float path (gptaq, rescomp), not to {name!r}")
        return data

    @model_serializer(mode="wrap")
    def _dump(self, handler) -> dict:
        """Only the options that apply to the method (plain GPTQ dumps as before the family existed)."""
        d = handler(self)
        if isinstance(d, dict):
            for opt in OPTION_PART:
                if d.get(opt) is None:
                    d.pop(opt, None)
            if d.get("float_samples") is None:
                d.pop("float_samples", None)
            if not set(FAMILY.get(self.name, ())) & FLOAT_PATH_PARTS:
                d.pop("residual", None)
        return d

    def parts(self) -> tuple[str, ...]:
        return FAMILY[self.name]


DAMP_CEILING = 1.0


def inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of ``(H + λ·mean(diag H)·I)⁻¹`` with λ escalating ×10 from ``damp``.

    Returns ``(U, λ)``, or ``(None, λ)`` when no λ ≤ 1 gives a positive-definite matrix.
    """
    h = h.double()
    mean_diag = torch.diag(h).mean()
    lam = damp
    while lam <= DAMP_CEILING * (1 + 1e-9):
        # the damping goes on the diagonal of a copy, in place: no n×n identity and sum temporaries
        # (for an 11008-wide layer each is ~1 GB of float64; the peak memory of large models)
        a = h.clone()
        a.diagonal().add_(lam * mean_diag)
        chol, info = torch.linalg.cholesky_ex(a)
        del a
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            del chol
            u, info2 = torch.linalg.cholesky_ex(inv, upper=True)
            del inv
            if int(info2) == 0 and torch.isfinite(u).all():
                return u.float(), lam
        lam *= 10
    return None, lam


@dataclass
class Term:
    """After column ``i`` is rounded, later columns ``j`` move by ``matrix[i, j] · coef(v_i, w0_i)``."""

    matrix: torch.Tensor  # (cols, cols) float32, strictly upper triangular, quantization order
    coef: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (v (rows,), w0 (rows,)) -> (rows,)


@dataclass
class SolveContext:
    """What an extension may build its terms from, all in quantization order."""

    U: torch.Tensor  # upper Cholesky factor of the damped H⁻¹
    H: torch.Tensor  # undamped H (float64), dead diagonal set to 1
    perm: torch.Tensor  # quantization order: column k is original column perm[k]
    dead: torch.Tensor  # (cols,) bool, original order


@dataclass
class Extensions:
    terms: list[Term]
    error: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = None
    residual: str = "latent"  # what v_i is for the terms: "latent" (clamped) or "rounded"
    needs_original: bool = False  # error/terms read w0


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    grid: GridConfig,
    *,
    act_order: bool = True,
    static_groups: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    base: QuantResult | None = None,
    extend: Callable[[SolveContext], Extensions] | None = None,
    mask: torch.Tensor | None = None,
    rounder: tuple[torch.Tensor, Callable[[torch.Tensor, int], torch.Tensor]] | None = None,
) -> QuantResult:
    """Quantize ``w`` (rows, cols) given ``h`` (cols, cols); returns dequantized weights on the grid.

    ``rounder = (g_idx, fn)`` replaces the uniform grid's rounding by ``fn(col, g)`` → the column rounded
    onto group ``g``'s own levels (static groups, the column's group from ``g_idx``): GPTQ's error
    update for another level set (HLQ's). The result's scale and zero are then empty.

    ``base`` (RTN of ``w`` on the same grid) supplies the static group parameters when given.
    ``extend(ctx)`` returns the extensions (error hook, terms) of a GPTQ-family member. ``mask``
    (rows, cols) bool keeps a pruner's zeros: a masked weight is rounded to 0 and its whole value is
    the error the later columns compensate. The result's ``latent`` holds each column's compensated
    value at the moment it was rounded.
    """
    W = w.float().clone()
    rows, cols = W.shape
    H = h.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    n_dead = int(dead.sum())

    gs = cols if grid.group_size == -1 else grid.group_size
    static = static_groups or grid.group_size == -1 or rounder is not None
    if rounder is not None:
        if extend is not None:
            raise ValueError("gptq_quantize: a rounder does not combine with a family member's extensions")
        g_idx, round_to = rounder
        scale = zero = torch.zeros(rows, 0, device=W.device)
    elif static:
        scale, zero, g_idx = (base.scale, base.zero, base.g_idx) if base is not None else G.grouped_params(W, grid)

    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(cols, device=W.device)
    W = W[:, perm]
    H = H[perm][:, perm]
    U, lam = inverse_cholesky(H, damp)
    if U is None:
        res = rtn_quantize(w, grid)
        res.info.update(damp=None, fallback="rtn: Hessian not positive definite even at damping 1.0", dead_columns=n_dead)
        return res
    ext = extend(SolveContext(U, H, perm, dead)) if extend is not None else Extensions([])
    terms, err_fn = ext.terms, ext.error
    rounded = ext.residual == "rounded"
    qmax = G.maxq(grid.bits)

    if static:
        col_group = g_idx.long()[perm].tolist()  # group of each column in quantization order
        scale_t, zero_t = scale.t().contiguous(), zero.t().contiguous()
        if terms and not rounded:  # each group's grid range, for the terms' clamped latent values
            lo_t, hi_t = -zero_t * scale_t, (qmax - zero_t) * scale_t
    else:
        col_group = (torch.arange(cols) // gs).tolist()
        scales: list[torch.Tensor] = []
        zeros: list[torch.Tensor] = []
    s_cur = z_cur = None
    # work on Wᵀ so that each column is a contiguous vector
    Wt = W.t().contiguous()
    W0t = Wt.clone() if ext.needs_original else None
    Qt = torch.empty_like(Wt)
    Lt = torch.empty_like(Wt)
    Mt = mask[:, perm].t().to(Wt.dtype).contiguous() if mask is not None else None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = Wt[i1:i2].clone()
        E1 = torch.empty_like(W1)
        C1 = [torch.empty_like(W1) for _ in terms]  # each term's coefficients c_i of this block
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if rounder is not None:
                g = col_group[j]
            elif static:
                g = col_group[j]
                s_cur, z_cur = scale_t[g], zero_t[g]
                if terms and not rounded:
                    lo, hi = lo_t[g], hi_t[g]
            elif j % gs == 0:
                # scales of the group from the weights as updated so far (this block's part is in W1)
                end = min(j + gs, cols)
                part = torch.cat([W1[i:], Wt[i2:end]], 0)[: end - j].t()
                s, z = G.find_params(part, grid)
                scales.append(s)
                zeros.append(z)
                s_cur, z_cur = s[:, 0], z[:, 0]
                lo, hi = -z_cur * s_cur, (qmax - z_cur) * s_cur
            col = W1[i]
            Lt[j] = col
            q = round_to(col, g) if rounder is not None else G.fake_quant(col, s_cur, z_cur, grid.bits)
            if Mt is not None:
                q = q * Mt[j]
            Qt[j] = q
            w0 = W0t[j] if W0t is not None else None
            err = (col - q) / U1[i, i] if err_fn is None else err_fn(col, q, w0, U1[i, i])
            if terms:
                v = q if rounded else torch.minimum(torch.maximum(col, lo), hi)
                for t, c in zip(terms, C1):
                    c[i] = t.coef(v, w0)
            W1[i:].addr_(U1[i, i:], err, alpha=-1.0)
            for t, c in zip(terms, C1):
                W1[i + 1 :].addr_(t.matrix[j, j + 1 : i2], c[i])
            E1[i] = err
        if i2 < cols:
            Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1.0)
            for t, c in zip(terms, C1):
                Wt[i2:].addmm_(t.matrix[i1:i2, i2:].t(), c)
    Q = Qt.t()

    invperm = torch.argsort(perm)
    Q = Q[:, invperm]
    latent = Lt.t()[:, invperm]
    if not static:
        scale, zero = torch.cat(scales, 1), torch.cat(zeros, 1)
        g_idx = torch.empty(cols, dtype=torch.int32, device=W.device)
        g_idx[perm] = torch.tensor(col_group, dtype=torch.int32, device=W.device)
    return QuantResult(Q, scale, zero, g_idx, {"damp": lam, "damp_escalated": lam > damp * (1 + 1e-9), "dead_columns": n_dead}, latent)


def triu_solve_term(A: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``triu(A Uᵀ, 1) U`` (float32): row ``i`` is ``A[i, F] H_FF⁻¹`` with ``F`` the columns after ``i``
    (``U[F, F]ᵀ U[F, F] = H_FF⁻¹``) — the least-squares compensation, by the not-yet-rounded columns,
    of a residual that column ``i`` leaves on the inputs correlated through ``A`` (GPTAQ's neuron
    decomposition)."""
    A64, U64 = A.double(), U.double()
    n = A64.shape[0]
    if n < 256:
        return (torch.triu(A64 @ U64.t(), diagonal=1) @ U64).float()
    # in 2×2 blocks, skipping the products that U's lower zeros and the triu make zero (half the
    # multiply-adds of the two full products; the same float64 sums up to their order)
    h = n // 2
    U11, U12, U22 = U64[:h, :h], U64[:h, h:], U64[h:, h:]
    M11 = torch.triu(A64[:h] @ U64[:h].t(), diagonal=1)  # (A Uᵀ)[:h, :h] = A[:h] U[:h]ᵀ
    M12 = A64[:h, h:] @ U22.t()                          # (A Uᵀ)[:h, h:] = A[:h, h:] U22ᵀ (U21 = 0)
    M22 = torch.triu(A64[h:, h:] @ U22.t(), diagonal=1)
    out = torch.zeros(n, n, dtype=torch.float32, device=A.device)
    out[:h, :h] = M11 @ U11
    out[:h, h:] = M11 @ U12 + M12 @ U22
    out[h:, h:] = M22 @ U22
    return out


# extension builders of the family's parts: part -> build(cfg, stats, ctx) -> Extensions (filled by gptaq.py, foem.py, rescomp.py)
EXTENSIONS: dict[str, Callable[[GPTQConfig, Optional[LayerStats], SolveContext], Extensions]] = {}


def resolve_residual(cfg: GPTQConfig, grid: GridConfig) -> str:
    return cfg.residual if cfg.residual != "auto" else ("rounded" if grid.bits <= 2 else "latent")


def family_quantize(w: torch.Tensor, h: torch.Tensor, grid: GridConfig, cfg: GPTQConfig, base: QuantResult | None = None,
                    stats: LayerStats | None = None, mask: torch.Tensor | None = None) -> QuantResult:
    """A GPTQ-family member: GPTQ with the extensions its name selects (module docstring)."""
    parts = cfg.parts()
    if any(p in FLOAT_PATH_PARTS for p in parts) and (stats is None or stats.dXX is None):
        raise WeightsmithError(f"{cfg.name} needs float-path statistics (LayerStats.dXX); the engine supplies them to steps that declare the need dXX")

    def extend(ctx: SolveContext) -> Extensions:
        out = Extensions([], residual=resolve_residual(cfg, grid))
        for p in parts:
            e = EXTENSIONS[p](cfg, stats, ctx)
            out.terms += e.terms
            out.error = e.error or out.error
            out.needs_original |= e.needs_original
        return out

    res = gptq_quantize(w, h, grid, act_order=cfg.act_order, static_groups=cfg.static_groups, damp=cfg.damp,
                        block_size=cfg.block_size, base=base, extend=extend if parts else None, mask=mask)
    if parts:
        res.info["residual"] = resolve_residual(cfg, grid)
    return res


def family_step(state, cfg: GPTQConfig, ctx) -> None:
    """GPTQ (Frantar et al. 2023) and its family: column-wise rounding with second-order error compensation."""
    state.set_grid(family_quantize(state.W, state.H, state.grid, cfg, base=ctx.rtn(state.W, state.grid), stats=state.stats, mask=state.mask))


def _needs(cfg: GPTQConfig) -> frozenset:
    return frozenset({"H", "dXX"} if set(cfg.parts()) & FLOAT_PATH_PARTS else {"H"})


def _float_samples(cfg: GPTQConfig):
    return cfg.float_samples if set(cfg.parts()) & FLOAT_PATH_PARTS else None


register_family({"gptq", *PART_ORDER}, canonical_family_name)
for _name in FAMILY:
    register(_name, GPTQConfig, kind="quantizer", needs=_needs, produces=("grid",), clip_search=True, float_samples=_float_samples)(family_step)
