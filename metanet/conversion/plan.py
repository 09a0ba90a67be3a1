"""Per-block operating points under one active budget, from measured sensitivity.

With delta[ℓ, k] the NLL increase when block ℓ alone runs k of E experts (metanet.conversion.sensitivity),
linearly interpolated between the measured k and 0 at k = E, and no lower than 0 (a carved block that measures
better than the dense one did so by chance), the whole model's loss is modelled as additive,

    log ppl_ratio(k_0, …, k_{L−1}) ≈ Σ_ℓ delta[ℓ, k_ℓ],

and a plan chooses the k_ℓ that minimise it under a budget on the active FFN fraction
(1/L) Σ_ℓ k_ℓ / E ≤ F, exactly, by dynamic programming over the total Σ_ℓ k_ℓ
(L · (E − k_min + 1) · L·E steps). `--max-ppl-ratio R` asks the reverse: the smallest budget whose
modelled ppl_ratio is at most R. The file `plan.json` holds the plan and the sensitivity it came from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from metanet.conversion.sensitivity import Sensitivity
from metanet.errors import MetanetError
from metanet.partition.partition import OperatingPoint

PLAN_FORMAT = 1


@dataclass
class Plan:
    """One active count per block, the fraction it averages to, and the ppl_ratio the sensitivity predicts for it."""

    experts: int
    shared: int
    active: list[int]  # k_ℓ per block
    predicted_ppl_ratio: float
    method: str = ""
    router: str = ""
    sensitivity: Sensitivity | None = None

    @property
    def active_fraction(self) -> float:
        return sum(self.active) / (len(self.active) * self.experts)

    def points(self, width_multiple: int = 8) -> list[OperatingPoint]:
        return [OperatingPoint(self.experts, k, self.shared, width_multiple) for k in self.active]

    def nominal_point(self, width_multiple: int = 8) -> OperatingPoint:
        """The uniform point with the plan's budget (its mean k, rounded)."""
        return OperatingPoint(self.experts, max(self.shared + 1, round(sum(self.active) / len(self.active))), self.shared, width_multiple)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = {"format": PLAN_FORMAT, "experts": self.experts, "shared": self.shared, "active": self.active,
                "active_fraction": round(self.active_fraction, 6), "predicted_ppl_ratio": self.predicted_ppl_ratio,
                "method": self.method, "router": self.router, "sensitivity": self.sensitivity.as_dict() if self.sensitivity else None}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=1))
        except OSError as exc:
            raise MetanetError(f"cannot write plan {path}: {exc.strerror or exc}") from None
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != PLAN_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {PLAN_FORMAT}")
            active = [int(k) for k in data["active"]]
            sensitivity = Sensitivity.from_dict(data["sensitivity"]) if data.get("sensitivity") else None
            return cls(int(data["experts"]), int(data["shared"]), active, float(data["predicted_ppl_ratio"]),
                       data.get("method", ""), data.get("router", ""), sensitivity)
        except FileNotFoundError:
            raise MetanetError(f"no such plan file: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            raise MetanetError(f"{path}: not a plan written by `metanet plan` ({type(exc).__name__}: {exc})") from None


def cost_table(sensitivity: Sensitivity) -> torch.Tensor:
    """delta[ℓ, k] for every k = 0..E: measured values clamped at 0, linear in between, 0 at k = E, +inf below the least
    measured k.   → [L, E + 1] float64"""
    experts, known = sensitivity.experts, sensitivity.actives + [sensitivity.experts]
    table = torch.full((sensitivity.delta.shape[0], experts + 1), math.inf, dtype=torch.float64)
    values = torch.cat([sensitivity.delta.clamp(min=0), torch.zeros(sensitivity.delta.shape[0], 1, dtype=torch.float64)], dim=1)  # [L, |known|]
    for (k0, v0), (k1, v1) in zip(zip(known, values.T), zip(known[1:], values.T[1:])):
        for k in range(k0, k1 + 1):
            table[:, k] = v0 + (v1 - v0) * (k - k0) / (k1 - k0)
    return table


def frontier(sensitivity: Sensitivity) -> tuple[torch.Tensor, torch.Tensor]:
    """For every total active count K = Σ_ℓ k_ℓ: the least modelled Σ_ℓ delta and its choice.
    → (best [L·E + 1] float64, +inf where impossible; choice [L, L·E + 1] int64, the k_ℓ of the best plan for each K)"""
    table = cost_table(sensitivity)
    n_blocks, experts = table.shape[0], sensitivity.experts
    total = n_blocks * experts
    best = torch.full((total + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    choices = torch.zeros(n_blocks, total + 1, dtype=torch.int64)  # choices[ℓ, K]: k_ℓ in the best plan of blocks ≤ ℓ summing to K
    for block in range(n_blocks):
        candidates = torch.full((experts + 1, total + 1), math.inf, dtype=torch.float64)  # [k, K]: best with k_ℓ = k
        for k in range(experts + 1):
            if math.isfinite(table[block, k]):
                candidates[k, k:] = best[: total + 1 - k] + table[block, k]
        best, choices[block] = candidates.min(dim=0)
    return best, choices


def _unwind(choices: torch.Tensor, total: int) -> list[int]:
    """The k_ℓ of the best plan whose counts sum to `total` (walking `frontier`'s choices back from the last block)."""
    active = []
    for block in range(choices.shape[0] - 1, -1, -1):
        k = int(choices[block, total])
        active.append(k)
        total -= k
    return active[::-1]


def make_plan(sensitivity: Sensitivity, active_fraction: float | None = None, max_ppl_ratio: float | None = None,
              method: str = "", router: str = "") -> Plan:
    """The plan with the least modelled ppl_ratio whose active fraction is at most `active_fraction`, or the plan with
    the least active fraction whose modelled ppl_ratio is at most `max_ppl_ratio` (exactly one of them)."""
    if (active_fraction is None) == (max_ppl_ratio is None):
        raise MetanetError("give exactly one of --active-fraction and --max-ppl-ratio")
    best, choices = frontier(sensitivity)
    n_blocks, experts = sensitivity.delta.shape[0], sensitivity.experts
    if active_fraction is not None:
        if not 0 < active_fraction <= 1:
            raise MetanetError(f"--active-fraction must be in (0, 1], got {active_fraction}")
        budget = math.floor(active_fraction * n_blocks * experts + 1e-9)
        feasible = torch.isfinite(best[: budget + 1]).nonzero()
        if not feasible.numel():
            least = sensitivity.actives[0] / experts
            raise MetanetError(f"--active-fraction {active_fraction} is below the least measured point ({least:.3f}: k={sensitivity.actives[0]} of {experts} everywhere)")
        total = int(torch.argmin(best[: budget + 1]))
    else:
        if max_ppl_ratio < 1:
            raise MetanetError(f"--max-ppl-ratio must be ≥ 1, got {max_ppl_ratio}")
        within = (best <= math.log(max_ppl_ratio)).nonzero()
        total = int(within[0]) if within.numel() else n_blocks * experts
    return Plan(experts, sensitivity.shared, _unwind(choices, total), math.exp(best[total].item()), method, router, sensitivity)


def pareto_curve(sensitivity: Sensitivity) -> list[tuple[float, float]]:
    """(active fraction, modelled ppl_ratio) of the best plan for every reachable total, in increasing fraction."""
    best, _ = frontier(sensitivity)
    n = sensitivity.delta.shape[0] * sensitivity.experts
    points, lowest = [], math.inf
    for total in range(n + 1):  # keep only the plans that beat every plan with a smaller budget
        value = best[total].item()
        if value < lowest:
            lowest = value
            points.append((total / n, math.exp(value)))
    return points


def uniform_points(sensitivity: Sensitivity) -> list[tuple[float, float]]:
    """(k/E, modelled ppl_ratio) of running every block at the same measured k."""
    return [(k / sensitivity.experts, math.exp(sensitivity.delta[:, a].sum().item())) for a, k in enumerate(sensitivity.actives)]
