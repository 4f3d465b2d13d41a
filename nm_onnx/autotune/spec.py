"""The autotune problem's inputs: the accuracy budget, the candidate patterns, the site groups.

Torch-free and checked before any slow work (one-line `NmOnnxError`, exit 2):

* budget: the allowed relative increase of perplexity over the dense model, `5%`, `+5%` or a fraction
  `0.05`; 0 < budget <= 1000% (more than 10x the dense perplexity is not a budget, it is a typo).
  In loss units (mean NLL per token, nats) it is `log(1 + budget)`.
* candidates: a comma list of `N:M` patterns and `dense`; `dense` is always added (the fallback that
  keeps a group as it is); every M must divide K at every selected site.
* groups: the sites that are tuned together. A decoder layer's sites that read the same input form one
  group: `attn_in` (q, k, v), `attn_out` (o), `mlp_in` (gate, up), `mlp_out` (down); any other site is
  a group of its own.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from nm_onnx.errors import NmOnnxError
from nm_onnx.recipe import DENSE, parse_pattern

MAX_BUDGET = 10.0  # +1000%
DEFAULT_CANDIDATES = "dense,12:16,10:16,8:16,6:16"
GROUP_OF_KIND = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
                 "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_out"}
_LAYER = re.compile(r"^(.*\.layers\.(\d+))\.")


@dataclass(frozen=True)
class Budget:
    relative: float  # allowed perplexity increase, 0.05 = +5%
    text: str

    @property
    def nll(self) -> float:
        """The budget in loss units: allowed increase of the mean NLL per token (nats)."""
        return math.log1p(self.relative)

    def __str__(self) -> str:
        return f"+{100 * self.relative:g}%"


def parse_budget(text: str) -> Budget:
    s = str(text).strip()
    body = s.removeprefix("+")
    try:
        value = float(body[:-1]) / 100 if body.endswith("%") else float(body)
    except ValueError:
        raise NmOnnxError(f"--budget '{text}' is not a number: write the allowed perplexity increase "
                          "as a percentage (5%) or a fraction (0.05)") from None
    if not math.isfinite(value) or value <= 0:
        raise NmOnnxError(f"--budget '{text}' must be a positive perplexity increase, e.g. 5%")
    if value > MAX_BUDGET:
        raise NmOnnxError(f"--budget '{text}' allows more than {100 * MAX_BUDGET:g}% (over 10x the dense "
                          "perplexity); write a percentage like 5% or a fraction like 0.05")
    return Budget(value, s)


def parse_candidates(text: str) -> list[str]:
    """['dense', '12:16', ...]: normalized, unique, dense first (always included)."""
    out = [DENSE]
    for raw in str(text).split(","):
        c = raw.strip().lower()
        if not c:
            continue
        if c == DENSE:
            continue
        try:
            n, m, _ = parse_pattern(c)
        except NmOnnxError as e:
            raise NmOnnxError(f"--candidates: unknown candidate '{raw.strip()}' ({e}); give N:M patterns "
                              "or dense, e.g. dense,12:16,8:16") from None
        if n is None:
            raise NmOnnxError(f"--candidates: '{raw.strip()}' is not an N:M pattern; autotune chooses among "
                              "N:M patterns and dense")
        if f"{n}:{m}" not in out:
            out.append(f"{n}:{m}")
    if len(out) == 1:
        raise NmOnnxError("--candidates names no N:M pattern; give at least one, e.g. dense,8:16")
    return out


def check_candidates(candidates: list[str], k: dict[str, int]) -> None:
    """Every candidate's M divides K at every selected site ({module: K}); names the first bad site."""
    for c in candidates:
        if c == DENSE:
            continue
        _, m, _ = parse_pattern(c)
        for path, size in k.items():
            if size % m:
                raise NmOnnxError(f"--candidates: pattern {c} does not divide K={size} at site '{path}' "
                                  f"(K % {m} != 0); drop {c} or exclude the site in --base-recipe")


def group_name(module: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'model.layers.3.mlp_in'; other sites are their own group."""
    leaf = module.rsplit(".", 1)[-1]
    m = _LAYER.match(module)
    if m and leaf in GROUP_OF_KIND:
        return f"{m.group(1)}.{GROUP_OF_KIND[leaf]}"
    return module


def layer_index(module: str) -> int | None:
    m = _LAYER.match(module)
    return int(m.group(2)) if m else None


def site_groups(modules) -> dict[str, list[str]]:
    """{group: [module paths]} in the order the modules come (the model's order)."""
    out: dict[str, list[str]] = {}
    for p in modules:
        out.setdefault(group_name(p), []).append(p)
    return out
