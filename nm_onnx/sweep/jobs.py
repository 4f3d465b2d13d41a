"""The sweep's jobs: export -> calibrate -> transform -> evaluate, each cached by the content of its inputs.

`plan(spec)` turns a spec into a list of `Job`s in dependency order. A job's key is a hash of its kind,
its settings and the keys of the jobs it depends on (which start from the model's and the recipe's
content: an alias name, a fingerprint of a local model's files, the recipe's digest), so a changed
input changes every key downstream of it and nothing else. `run_job` computes one job into
`ROOT/cache/<kind>/<key>` (directories through the pipeline's own atomic writers, evaluation results
as atomic JSON files) or returns the cached result when that entry exists: a re-run computes only
what changed, and a killed sweep resumes where it stopped (a half-written entry never exists).

Job functions are module-level and take and return plain data, so any backend (nm_onnx.sweep.backends)
can run them in another process or on another machine that sees ROOT.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from nm_onnx.errors import NmOnnxError
from nm_onnx.sweep.spec import TORCH_ONLY, ModelEntry, RecipeEntry, SweepSpec

CACHE = "cache"


@dataclass(frozen=True)
class Job:
    id: str  # e.g. "transform:llama/8:16-magnitude"
    kind: str  # export | calibrate | transform | evaluate
    key: str  # content key: the cache entry's name
    params: dict = field(hash=False)
    deps: tuple[str, ...] = ()  # ids of the jobs whose results this one reads
    cell: tuple[str, str] | None = None  # (model, recipe) of the report row it feeds


def _digest(obj) -> str:
    from nm_onnx import __version__

    body = json.dumps({"v": __version__, **obj}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def source_fingerprint(source: str) -> str:
    """Content identity of a model source: an alias by name, a local file or folder by its files'
    names, sizes and modification times (hashing gigabytes of weights would cost more than a job)."""
    p = Path(source).expanduser()
    if not p.exists():
        return f"alias:{source}"
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def recipe_fingerprint(source: str) -> str:
    from nm_onnx.recipe import SparsityRecipe

    return SparsityRecipe.load(source).digest()[:16]


def plan(spec: SweepSpec) -> list[Job]:
    """Every job of the sweep, each after the jobs it depends on.

    Per model: export (or the given export), then per recipe the job that makes its sparse model
    (calibrate + transform; autotune + transform; none for dense and weight rows), then one evaluate
    job per evaluation. A model's autotune jobs run one after another (each depends on the previous):
    they share one work directory, so the sensitivity and speed tables are measured once per model.
    """
    from nm_onnx.recipe import SparsityRecipe

    jobs: list[Job] = []
    for m in spec.models:
        given = m.source if m.onnx else m.export
        hf = None if m.onnx else source_fingerprint(m.source)  # the PyTorch model's identity
        export = Job(f"export:{m.name}", "export",
                     _digest({"k": "export", "src": source_fingerprint(given or m.source)}),
                     {"source": m.source, "given": given})
        jobs.append(export)
        previous_autotune = None
        for r in spec.recipes:
            cell = (m.name, r.name)
            model_job, recipe_key = export, None
            upstream: Job | None = None  # the calibrate or autotune job the sparse model (and its twin) reads
            torch_deps: dict[str, str] = {}  # that job's id by what it gives: cal_dep (artifact) / recipe_dep
            if r.kind == "autotune":
                work = _digest({"k": "autotune-work", "src": export.key, "hf": hf, "s": spec.autotune,
                                "threads": spec.threads})
                tune = Job(f"autotune:{m.name}/{r.name}", "autotune",
                           _digest({"k": "autotune", "work": work, "budget": r.source}),
                           {"source": m.source, "budget": r.source, "settings": spec.autotune, "work": work,
                            "threads": spec.threads},
                           tuple(d for d in (export.id, previous_autotune) if d), cell)
                jobs.append(tune)
                previous_autotune = tune.id
                recipe_key, upstream, torch_deps = tune.key, tune, {"recipe_dep": tune.id}
            elif r.kind == "recipe":
                recipe_key = recipe_fingerprint(r.source)
                if SparsityRecipe.load(r.source).needs_calibration:
                    cal = Job(f"calibrate:{m.name}/{r.name}", "calibrate",
                              _digest({"k": "calibrate", "src": export.key, "hf": hf, "recipe": recipe_key,
                                       **spec.calibration}),
                              {"source": m.source, "onnx": m.onnx, "recipe": r.source, **spec.calibration},
                              cell=cell)
                    jobs.append(cal)
                    upstream, torch_deps = cal, {"cal_dep": cal.id}
            up_key = upstream.key if upstream else None
            if recipe_key is not None:
                model_job = Job(f"transform:{m.name}/{r.name}", "transform",
                                _digest({"k": "transform", "dense": export.key, "recipe": recipe_key, "cal": up_key}),
                                {"recipe": r.source if r.kind == "recipe" else None, **torch_deps},
                                (export.id, upstream.id) if upstream else (export.id,), cell)
                jobs.append(model_job)
            for ev, settings in spec.evaluations.items():
                if r.kind == "weight" and ev not in TORCH_ONLY:
                    continue  # a weight-pruned model exists in PyTorch only
                data = settings.get("data")
                content = source_fingerprint(data) if data and Path(data).is_file() else None  # a text file
                torch_side = ev == "twin" or r.kind == "weight"
                deps = tuple(dict.fromkeys([model_job.id, export.id, *([upstream.id] if torch_side and upstream else [])]))
                params = {"evaluation": ev, "settings": settings, "threads": spec.threads,
                          "model_dep": model_job.id, "dense_dep": export.id}
                if torch_side:
                    params.update(source=m.source, recipe=r.source if r.kind in ("recipe", "weight") else None,
                                  kind=r.kind, **torch_deps)
                jobs.append(Job(f"evaluate:{m.name}/{r.name}/{ev}", "evaluate",
                                _digest({"k": ev, "model": model_job.key, "dense": export.key, "s": settings,
                                         "data": content, "threads": spec.threads,
                                         **({"hf": hf, "kind": r.kind, "recipe": recipe_key or r.source,
                                             "cal": up_key} if torch_side else {})}),
                                params, deps, cell))
    return jobs


# ------------------------------------------------------------------------------------------ running
def entry(root: str | os.PathLike, job: Job) -> Path:
    suffix = ".json" if job.kind == "evaluate" else ""
    return Path(root) / CACHE / job.kind / f"{job.key}{suffix}"


def cached(root, job: Job) -> dict | None:
    """The job's result when its cache entry exists (complete: entries appear atomically), else None."""
    from nm_onnx.io import read_manifest

    if job.kind == "export" and job.params["given"]:
        return {"dir": job.params["given"]}
    p = entry(root, job)
    if job.kind == "evaluate":
        try:
            return json.loads(p.read_text())["result"]
        except (OSError, ValueError, KeyError):
            return None
    mark = read_manifest(p)
    if mark is None or mark.get("kind") not in ("export", "calibration", "transform", "autotune"):
        return None
    return _autotune_result(p) if job.kind == "autotune" else {"dir": str(p)}


def _autotune_result(out: Path) -> dict:
    """What the report needs from an autotune output: its recipe, verified numbers, MAC-weighted sparsity."""
    rep = json.loads((out / "report.json").read_text())
    res = {"dir": str(out), "recipe": str(out / "recipe.json"), "within_budget": rep["within_budget"],
           "verified_ppl": rep["verified"]["perplexity"], "sparsity": rep.get("sparsity")}
    if not rep["within_budget"]:
        res["note"] = (f"autotune {rep['budget']}: no round verified within the budget; the recipe is the "
                       f"tightest one tried (perplexity {rep['verified']['perplexity']:.3f})")
    return res


def run_job(root: str, job: Job, deps: dict[str, dict], fresh: bool = False) -> tuple[str, dict]:
    """('cached' | 'computed', result) of one job; raises on failure (the backend reports it)."""
    hit = None if fresh else cached(root, job)
    if hit is not None:
        return "cached", hit
    out = entry(root, job)
    out.parent.mkdir(parents=True, exist_ok=True)
    if job.kind == "export":
        from nm_onnx.export import export

        export(job.params["source"], out, overwrite=fresh)
        return "computed", {"dir": str(out)}
    if job.kind == "calibrate":
        _calibrate(job.params, out, fresh)
        return "computed", {"dir": str(out)}
    if job.kind == "autotune":
        work = Path(root) / CACHE / "autotune-work" / job.params["work"]
        if fresh and len(job.deps) == 1 and work.is_dir():  # the model's first budget: measure the tables anew
            import shutil

            shutil.rmtree(work)
        _autotune(job.params, deps[job.deps[0]]["dir"], out, work, fresh)
        return "computed", _autotune_result(out)
    if job.kind == "transform":
        from nm_onnx.transform import transform

        p = job.params
        recipe = deps[p["recipe_dep"]]["recipe"] if "recipe_dep" in p else p["recipe"]
        cal = deps[p["cal_dep"]]["dir"] if "cal_dep" in p else None
        transform(deps[job.deps[0]]["dir"], out, recipe, calibration=cal, overwrite=fresh)
        return "computed", {"dir": str(out)}
    if job.kind == "evaluate":
        from nm_onnx.io import write_json

        p = job.params
        model, dense = deps[p["model_dep"]]["dir"], deps[p["dense_dep"]]["dir"]
        if "kind" in p:  # the PyTorch side: twin, or a weight-pruned row
            recipe = deps[p["recipe_dep"]]["recipe"] if "recipe_dep" in p else p["recipe"]
            cal = deps[p["cal_dep"]]["dir"] if "cal_dep" in p else None
            result = evaluate_torch(p["evaluation"], p["settings"], p["source"], p["kind"], recipe, cal, model, dense,
                                    p["threads"])
        else:
            result = evaluate(p["evaluation"], p["settings"], model, dense, p["threads"])
        write_json(out, {"job": job.id, "result": result})
        return "computed", result
    raise NmOnnxError(f"unknown job kind {job.kind!r}")


def _autotune(p: dict, export_dir: str, out: Path, work: Path, fresh: bool) -> None:
    """`nm-onnx autotune` for one budget; the model's work directory (tables, verified points) is shared."""
    from nm_onnx.autotune.run import autotune
    from nm_onnx.autotune.spec import parse_budget, parse_candidates
    from nm_onnx.recipe import SparsityRecipe

    s = p["settings"]
    # autotune() checks the candidates against every site's K first, before any table is measured
    autotune(p["source"], export_dir, out, parse_budget(p["budget"]), parse_candidates(s["candidates"]),
             SparsityRecipe.load(s["base_recipe"]), work, samples=s["samples"], seqlen=s["seqlen"],
             check=s["check"], eval_data=s["eval_data"], eval_limit=s["limit"],
             eval_seqlen=s["eval_seqlen"], prompt=s["prompt"], decode=s["decode"], repeats=s["repeats"],
             threads=p["threads"], speed_repeats=s["speed_repeats"], uniform=(), max_rounds=s["max_rounds"],
             overwrite=fresh, progress=False, keep_work=True)


def _calibrate(p: dict, out: Path, fresh: bool) -> None:
    if p["onnx"]:
        raise NmOnnxError(f"recipe '{p['recipe']}' needs calibration, which runs on the PyTorch model; "
                          f"'{p['source']}' is an ONNX export: give its Hugging Face source instead")
    from nm_onnx.calibration import calibrate
    from nm_onnx.data import bos_id, calibration_windows, load_calibration_text, tokenize
    from nm_onnx.models import check_context, load_hf_model, resolve_model
    from nm_onnx.recipe import SparsityRecipe

    rec = SparsityRecipe.load(p["recipe"])
    rec.calibration.update(samples=p["samples"], seqlen=p["seqlen"])
    hf = resolve_model(p["source"])
    check_context(hf, p["seqlen"], "calibration.seqlen")
    model, tok = load_hf_model(hf)
    text = load_calibration_text(rec.calibration["data"])
    first = bos_id(tok, "auto")
    windows = calibration_windows(tokenize(tok, text.text), p["samples"], p["seqlen"], rec.calibration["seed"], first)
    calibrate(model, rec, windows, out, data_source=text.source, model_source=str(p["source"]), progress=False,
              overwrite=fresh, bos=first)


def evaluate(kind: str, s: dict, model: str, dense: str, threads=None) -> dict:
    """Metrics {name: value} of one evaluation of `model` (tokenizer and bench baseline: `dense`)."""
    from nm_onnx.evaluation.tokenizer import load_tokenizer
    from nm_onnx.runtime import make_session

    sess = make_session(model, threads=threads)
    tok = load_tokenizer(dense)
    if kind == "perplexity":
        from nm_onnx.evaluation.perplexity import perplexity_onnx

        windows = _windows(tok, s, dense, "evaluations.perplexity.seqlen")
        return {"ppl": perplexity_onnx(sess, windows, progress=False).perplexity}
    if kind == "lm_eval":
        from nm_onnx.evaluation.lm_eval_adapter import evaluate_tasks

        res = evaluate_tasks(model, s["tasks"], limit=s["limit"] or None, tokenizer=tok, session=sess,
                             batch_size=s["batch_size"])
        return {f"{t}.{k}": v for t, ms in res.items() for k, v in ms.items() if k != "samples"}
    if kind == "bench":
        from nm_onnx.evaluation.latency import measure, paired_speedup

        if Path(model) == Path(dense):
            r = measure({"model": sess}, s["prompt"], s["decode"], s["repeats"], 1)["model"]
            return {k: r[k] for k in ("prefill_tok_s", "decode_tok_s") if k in r}
        base = make_session(dense, threads=threads)
        r = measure({"dense": base, "model": sess}, s["prompt"], s["decode"], s["repeats"], 1)
        out = {k: r["model"][k] for k in ("prefill_tok_s", "decode_tok_s") if k in r["model"]}
        out.update(paired_speedup(r["model"], r["dense"]))
        return out
    raise NmOnnxError(f"unknown evaluation {kind!r}")


def _windows(tok, s: dict, dense: str, option: str):
    from nm_onnx.data import bos_id, eval_windows, load_eval_text, tokenize
    from nm_onnx.models import check_context

    check_context(dense, s["seqlen"], option)
    text = load_eval_text(s["data"])
    return eval_windows(tokenize(tok, text.text), s["seqlen"], s["windows"] or None, bos_id(tok, "auto"))


def evaluate_torch(kind: str, s: dict, source: str, row: str, recipe, calibration, model: str, dense: str,
                   threads=None) -> dict:
    """The PyTorch side of a row: `twin` (the reference simulation of the recipe and ORT on the same
    windows) or the perplexity of a weight-pruned model (`row` = weight, `recipe` its N:M pattern)."""
    from nm_onnx.evaluation.tokenizer import load_tokenizer
    from nm_onnx.models import load_hf_model, resolve_model
    from nm_onnx.reference.perplexity import nll_torch

    tok = load_tokenizer(dense)
    windows = _windows(tok, s, dense, f"evaluations.{kind}.seqlen")
    torch_model, _ = load_hf_model(resolve_model(source))
    if row == "weight":
        from nm_onnx.reference import apply_weight_pruning

        apply_weight_pruning(torch_model, recipe, "magnitude")
        return {"ppl_torch": nll_torch(torch_model, windows).perplexity}
    if kind != "twin":
        raise NmOnnxError(f"evaluation {kind!r} has no PyTorch side")
    from nm_onnx.evaluation.perplexity import perplexity_onnx
    from nm_onnx.runtime import make_session

    if row != "dense":
        from nm_onnx.calibration import load_artifact
        from nm_onnx.reference import sparsify_model

        sparsify_model(torch_model, recipe, load_artifact(calibration) if calibration else None)
    return {"ppl_torch": nll_torch(torch_model, windows).perplexity,
            "ppl_ort": perplexity_onnx(make_session(model, threads=threads), windows, progress=False).perplexity}


def cells(spec: SweepSpec) -> list[tuple[ModelEntry, RecipeEntry]]:
    return [(m, r) for m in spec.models for r in spec.recipes]
