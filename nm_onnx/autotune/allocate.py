"""Choose one candidate per group: the most decode time saved whose predicted loss fits the budget.

A multiple-choice knapsack, solved exactly by dynamic programming over the budget cut into
`resolution` equal units. Each option's cost (predicted loss increase, nats per token; a negative
measured cost counts as 0) is rounded *up* to whole units, so the chosen options' true predicted
cost never exceeds the budget; within that rounding the solution is optimal (tests compare it with
brute force). Options that save no time are never better than `dense` (cost 0, saved 0), which every
group has. Ties go to the option listed first (dense first, then the candidates in order).
Pure Python + numpy: no torch, no ORT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from nm_onnx.recipe import DENSE


@dataclass(frozen=True)
class Option:
    pattern: str
    cost: float  # predicted loss increase (nats per token) of this group alone
    saved: float  # decode time saved per step (ms)


@dataclass
class Allocation:
    choice: dict[str, str]  # group -> pattern
    cost: float  # sum of the chosen options' predicted costs (clipped at 0)
    saved: float  # sum of the chosen options' saved time
    budget: float
    options: dict[str, list[Option]] = field(default_factory=dict, repr=False)

    def sparse_groups(self) -> list[str]:
        return [g for g, p in self.choice.items() if p != DENSE]


def _with_dense(opts: list[Option]) -> list[Option]:
    rest = [o for o in opts if o.pattern != DENSE]
    return [Option(DENSE, 0.0, 0.0), *rest]


def allocate(options: dict[str, list[Option]], budget: float, resolution: int = 2000) -> Allocation:
    """The allocation maximising the saved time with sum(cost) <= budget (costs rounded up to units)."""
    if not (budget >= 0 and math.isfinite(budget)):
        raise ValueError(f"budget must be a finite number >= 0, got {budget}")
    groups = list(options)
    opts = {g: _with_dense(options[g]) for g in groups}
    if budget == 0 or not groups:
        return _result(groups, opts, {g: 0 for g in groups}, budget)
    unit = budget / resolution
    width = resolution + 1
    best = np.zeros(width)  # best[c]: most time saved using at most c units
    picks = np.zeros((len(groups), width), dtype=np.int32)
    for gi, g in enumerate(groups):
        new = best.copy()  # option 0 (dense): cost 0, saved 0
        pick = np.zeros(width, dtype=np.int32)
        for oi, o in enumerate(opts[g][1:], start=1):
            if not o.saved > 0:
                continue
            units = math.ceil(max(o.cost, 0.0) / unit - 1e-9)
            if units > resolution:
                continue
            cand = np.full(width, -np.inf)
            cand[units:] = best[: width - units] + o.saved
            better = cand > new
            new = np.where(better, cand, new)
            pick = np.where(better, oi, pick)
        best = new
        picks[gi] = pick
    c = resolution
    chosen = {}
    for gi in range(len(groups) - 1, -1, -1):
        g = groups[gi]
        oi = int(picks[gi, c])
        chosen[g] = oi
        if oi:
            c -= math.ceil(max(opts[g][oi].cost, 0.0) / unit - 1e-9)
    return _result(groups, opts, chosen, budget)


def _result(groups, opts, chosen: dict[str, int], budget: float) -> Allocation:
    picked = {g: opts[g][chosen[g]] for g in groups}
    return Allocation({g: o.pattern for g, o in picked.items()},
                      sum(max(o.cost, 0.0) for o in picked.values()),
                      sum(o.saved for o in picked.values()), budget, opts)


def to_recipe(choice: dict[str, str], groups: dict[str, list[str]], base, name: str):
    """The allocation as a mixed `SparsityRecipe` for `nm-onnx transform`.

    The recipe keeps the base recipe's criterion, mitigations, targets, excludes and share_selection
    (a group's sites read one input and get one pattern, so q/k/v and gate/up can share); its own pattern
    is the one the most sites got, and one override per other pattern (dense included) lists the
    exact module paths that get it. None when every group stays dense.
    """
    from collections import Counter

    from nm_onnx.recipe import SparsityRecipe

    sites: dict[str, list[str]] = {}
    for g, p in choice.items():
        sites.setdefault(p, []).extend(groups[g])
    counts = Counter({p: len(m) for p, m in sites.items() if p != DENSE})
    if not counts:
        return None
    main = counts.most_common(1)[0][0]
    overrides = [{"modules": sorted(m), "pattern": p} for p, m in sorted(sites.items()) if p != main]
    return SparsityRecipe(name=name, pattern=main, criterion=base.criterion, shift=base.shift,
                          variance_correction=base.variance_correction, targets=list(base.targets),
                          exclude=list(base.exclude), overrides=overrides,
                          share_selection=base.share_selection).validate()


def shrink(allocation_budget: float, budget: float, verified: float) -> float:
    """The next round's allocation budget after a verified loss over the budget: scaled by
    budget / verified (the overshoot), and at least 10% smaller."""
    return allocation_budget * min(0.9, budget / max(verified, 1e-12))


def grow(allocation_budget: float, budget: float, verified: float) -> float:
    """The next round's allocation budget after a verified loss well under the budget (the summed
    single-group predictions overestimate the joint loss): scaled by budget / verified, between
    1.25x and 4x."""
    return allocation_budget * min(4.0, max(1.25, budget / max(verified, 1e-12)))


def tighten(options: dict[str, list[Option]], budget: float, verify, max_rounds: int = 3):
    """Search the allocation budget whose allocation saves the most time with a verified loss within `budget`.

    `verify(allocation, round) -> dict | None` measures an allocation end to end (a dict with
    `delta_nll`) or returns None when it cannot be expressed (every group dense). Round 0 allocates
    `budget` itself. After a round over the budget the allocation budget shrinks (`shrink`); after one
    within it, it grows (`grow`: the single-group predictions add up to more than the joint loss when
    groups interact sub-additively, which leaves time unsaved); once both a within and an over round
    exist, it bisects between them (geometric mean). Stops after `max_rounds`, or when a new budget
    gives an allocation already tried, or when nothing more can be saved. Returns (rounds, accepted):
    rounds = [(allocation budget, Allocation, verified dict)], accepted = the index of the round
    within `budget` that saves the most predicted time, or None.
    """
    rounds: list = []
    b, lo, hi = budget, None, None
    most = sum(max((o.saved for o in opts if o.saved > 0), default=0.0) for opts in options.values())
    for i in range(max_rounds):
        alloc = allocate(options, b)
        if not alloc.sparse_groups() or any(a.choice == alloc.choice for _, a, _ in rounds):
            break
        v = verify(alloc, i)
        if v is None:
            break
        rounds.append((b, alloc, v))
        if v["delta_nll"] <= budget:
            lo = b
            if alloc.saved >= most - 1e-12:
                break  # every group already at its fastest option
        else:
            hi = b
        if hi is None:
            b = grow(b, budget, v["delta_nll"])
        elif lo is None:
            b = shrink(b, budget, v["delta_nll"])
        else:
            b = math.sqrt(lo * hi)
    within = [j for j, (_, a, v) in enumerate(rounds) if v["delta_nll"] <= budget]
    accepted = max(within, key=lambda j: (rounds[j][1].saved, -j)) if within else None
    return rounds, accepted
