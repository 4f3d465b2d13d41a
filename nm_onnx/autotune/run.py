"""`autotune`: the fastest mixed recipe whose verified perplexity stays within the budget.

Pipeline (each step cached in the work directory, so an interrupted run resumes where it stopped):
  1. sites and groups of the dense export (`spec.site_groups`), candidates checked against every K;
  2. sensitivity: predicted loss increase per (group, candidate) on calibration text (`sensitivity`);
  3. speed: measured decode time saved per site shape and candidate (`speed`);
  4. allocation: exact multiple-choice knapsack under the budget in nats (`allocate`);
  5. verification on evaluation windows through ORT (`verify`); steps 4-5 repeat up to `max_rounds`
     times, searching the allocation budget (`allocate.tighten`): it shrinks after a verified loss over
     the budget, grows after one well within it (the summed single-group predictions overestimate the
     joint loss when groups interact sub-additively), then bisects; the recipe is the within-budget
     round that saves the most time;
  6. outputs, atomically: recipe.json, report.json, report.md, frontier.csv/.png, the two tables.
The uniform presets (base recipe with each `uniform` pattern on every site) are verified the same
way for the frontier plot. Imports torch (the sensitivity uses the PyTorch reference).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

from nm_onnx.autotune.allocate import Option, tighten, to_recipe
from nm_onnx.autotune.report import markdown, write_frontier
from nm_onnx.autotune.spec import Budget, check_candidates, site_groups
from nm_onnx.autotune.speed import SpeedTable
from nm_onnx.autotune.verify import Verifier
from nm_onnx.errors import NmOnnxError
from nm_onnx.recipe import DENSE, SparsityRecipe


def log(msg: str) -> None:
    print(f"nm-onnx autotune: {msg}", file=sys.stderr, flush=True)


def check_base_recipe(base: SparsityRecipe) -> None:
    if base.overrides:
        raise NmOnnxError(f"--base-recipe '{base.name}' has overrides; autotune writes the per-site patterns "
                          "itself: give a recipe without overrides")
    if base.needs_calibration:
        raise NmOnnxError(f"--base-recipe '{base.name}' needs calibration constants (static/learned shift, "
                          "scale_shift, amber or wanda); autotune supports calibration-free recipes: magnitude "
                          "or clact, shift none/median/mean, variance correction")


def export_sites(export_dir, base: SparsityRecipe, candidates: list[str]):
    """(selected LinearSites in model order, groups) of the dense export; candidates checked against K."""
    from nm_onnx.graph import find_linear_sites, load_model

    sites = find_linear_sites(load_model(export_dir))
    by_module = {s.module: s for s in sites}
    chosen = base.match(list(by_module))
    check_candidates(candidates, {m: by_module[m].k for m in chosen})
    selected = [by_module[m] for m in chosen]
    return selected, site_groups([s.module for s in selected])


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def autotune(model_source, export_dir, out, budget: Budget, candidates: list[str], base: SparsityRecipe,
             work_dir, data="wikitext2", samples=8, seqlen=256, seed=0, check=8, bos="auto",
             eval_data="wikitext2", eval_limit=8, eval_seqlen=512, prompt=128, decode=32, repeats=3,
             threads=None, speed_repeats=200, uniform=("2:4", "8:16", "16:32"), max_rounds=3,
             overwrite=False, progress=True, input_paths=(), keep_work=True) -> dict:
    import numpy as np
    import torch

    from nm_onnx.autotune.sensitivity import SensitivityTable, measure_sensitivity
    from nm_onnx.data import bos_id, calibration_windows, load_calibration_text, tokenize
    from nm_onnx.evaluation.latency import cpu_info
    from nm_onnx.io import atomic_dir, mark_work_dir
    from nm_onnx.models import load_hf_model, resolve_model

    work = Path(work_dir)
    mark_work_dir(work)
    sites, groups = export_sites(export_dir, base, candidates)
    log(f"{len(sites)} sites in {len(groups)} groups; candidates {', '.join(candidates)}; budget {budget}")

    # 2. sensitivity (calibration text only)
    text = load_calibration_text(data, option="--data")
    model, tok = load_hf_model(resolve_model(model_source))
    first = bos_id(tok, bos)
    windows = calibration_windows(tokenize(tok, text.text), samples, seqlen, seed, first)
    method = {f: getattr(base, f) for f in ("criterion", "shift", "variance_correction", "targets", "exclude")}
    key = _digest(str(model_source), str(getattr(model, "config", "")), np.asarray(windows).tolist(), candidates,
                  method, check, seed)
    table = SensitivityTable(work / "sensitivity.json", key)
    measure_sensitivity(model, groups, candidates, base, windows, table, check=check, seed=seed,
                        progress=progress, log=log)
    del model
    costs = table.costs()
    summary = table.check_summary()
    log(f"sensitivity: proxy vs exact on {summary['pairs']} pairs: Spearman {summary['spearman']}, "
        f"scale {summary['scale']:.3g}")

    # 3. speed (this machine)
    speed = SpeedTable(work / "speed.json")
    speed.ensure({(s.k, s.o) for s in sites}, candidates, base.shift, base.variance_correction, threads,
                 speed_repeats, log)
    site_of = {s.module: s for s in sites}

    def saved(g, p):
        return sum(speed.get(site_of[m].k, site_of[m].o, p, base.shift, base.variance_correction, threads)["saved_ms"]
                   for m in groups[g])

    options = {g: [Option(p, costs[g][p] if p != DENSE else 0.0, saved(g, p) if p != DENSE else 0.0)
                   for p in candidates] for g in groups}

    # 5. verification of the uniform presets and of the allocation rounds
    verifier = Verifier(export_dir, work, ppl=eval_data, limit=eval_limit, seqlen=eval_seqlen, bos=bos,
                        prompt=prompt, decode=decode, repeats=repeats, threads=threads, log=log)
    dense = verifier.dense()
    uniform_points = []
    for u in uniform:
        r = SparsityRecipe(name=f"uniform-{u}", pattern=u, criterion=base.criterion, shift=base.shift,
                           variance_correction=base.variance_correction, targets=list(base.targets),
                           exclude=list(base.exclude), share_selection=base.share_selection)
        uniform_points.append({**verifier.point(r, f"{u} uniform"), "kind": "uniform"})

    name = f"autotune-{str(budget).lstrip('+')}"

    def verify(alloc, i):
        recipe = to_recipe(alloc.choice, groups, base, name)
        log(f"round {i}: {len(alloc.sparse_groups())}/{len(groups)} groups sparse, predicted Δnll "
            f"{alloc.cost:.4f} of {alloc.budget:.4f}, predicted saving {alloc.saved:.3f} ms/step")
        pt = verifier.point(recipe, f"autotune {budget} r{i}", extra={"budget": str(budget)})
        log(f"round {i}: verified perplexity {pt['perplexity']:.3f} ({100 * pt['relative_perplexity']:+.2f}% vs "
            f"budget {budget}), decode speedup {pt['decode_speedup']:.2f}x")
        return {**pt, "recipe": recipe.to_dict()}

    tried, ok = tighten(options, budget.nll, verify, max_rounds)
    rounds = [{"allocation_budget": b, "predicted_nll": a.cost, "predicted_saved_ms": a.saved,
               "sparse_groups": len(a.sparse_groups()), "choice": a.choice,
               "verified": {k: x for k, x in v.items() if k != "recipe"}, "recipe": v["recipe"]}
              for b, a, v in tried]
    accepted = None if ok is None else rounds[ok]
    if rounds:
        chosen = accepted if accepted is not None else rounds[-1]  # else: the tightest one tried
        chosen_recipe = SparsityRecipe.from_dict(chosen["recipe"])
        alloc_choice, verified = chosen["choice"], chosen["verified"]
    else:
        fast = sum(1 for g in options for o in options[g] if o.saved > 0)
        why = ("no candidate saves decode time at any site on this machine (the sparse op is slower than "
               "dense MatMul at these shapes)" if not fast else
               f"every one of the {fast} (group, pattern) options that save time has a predicted loss over it")
        raise NmOnnxError(f"budget {budget} admits no sparse group: {why}; give a larger --budget or other "
                          "--candidates (e.g. 14:16)")

    # 6. outputs
    group_rows = []
    for g, p in alloc_choice.items():
        row = {"group": g, "sites": len(groups[g]), "modules": groups[g], "pattern": p,
               "predicted_nll": costs[g].get(p, 0.0) if p != DENSE else 0.0,
               "saved_ms": saved(g, p) if p != DENSE else 0.0,
               "candidates": {c: {"predicted_nll": costs[g][c], "proxy": table.data["proxy"][g][c],
                                  "saved_ms": saved(g, c)} for c in candidates if c != DENSE}}
        m = table.data["true"].get(g, {}).get(p)
        if m is not None:
            row["measured_nll"] = m
        group_rows.append(row)
    report = {
        "model": str(model_source), "export": str(export_dir), "budget": str(budget), "budget_nll": budget.nll,
        "candidates": candidates, "base_recipe": base.name, "within_budget": accepted is not None,
        "recipe": chosen_recipe.to_dict(), "sparsity": chosen_recipe.mac_sparsity({s.module: (s.k, s.o) for s in sites}),
        "verified": verified, "dense": dense, "uniform": uniform_points,
        "rounds": rounds, "groups": group_rows, "eval_data": eval_data, "machine": cpu_info(),
        "bench": {"prompt": prompt, "decode": decode, "repeats": repeats, "threads": threads},
        "sensitivity": {"data": text.source, "windows": len(windows), "seqlen": int(windows.shape[1]),
                        "dense_nll": table.data["dense_nll"], "check": summary,
                        "true": table.data["true"]},
    }
    verifier.mark_accepted(verified["digest"] if accepted is not None else None, str(budget))
    frontier = [*uniform_points] + [{**v, "kind": "autotune" if v.get("accepted") else "autotune-round"}
                                    for v in verifier.cached_points() if v.get("budget")]
    with atomic_dir(out, "autotune", overwrite, inputs=list(input_paths)) as tmp:
        chosen_recipe.save(tmp / "recipe.json")
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
        (tmp / "report.md").write_text(markdown(report))
        shutil.copy(work / "sensitivity.json", tmp / "sensitivity.json")
        shutil.copy(work / "speed.json", tmp / "speed.json")
        write_frontier(frontier, dense, tmp)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    del torch
    return report
