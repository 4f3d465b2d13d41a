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
from nm_onnx.sweep.spec import DENSE, ModelEntry, RecipeEntry, SweepSpec

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
    """Every job of the sweep, each after the jobs it depends on."""
    from nm_onnx.recipe import SparsityRecipe

    jobs: list[Job] = []
    for m in spec.models:
        export = Job(f"export:{m.name}", "export", _digest({"k": "export", "src": source_fingerprint(m.source)}),
                     {"source": m.source, "onnx": m.onnx})
        jobs.append(export)
        for r in spec.recipes:
            cell = (m.name, r.name)
            model_job = export
            if r.source != DENSE:
                rec = recipe_fingerprint(r.source)
                deps = [export.id]
                cal_key = None
                if SparsityRecipe.load(r.source).needs_calibration:
                    cal = Job(f"calibrate:{m.name}/{r.name}", "calibrate",
                              _digest({"k": "calibrate", "src": export.key, "recipe": rec, **spec.calibration}),
                              {"source": m.source, "onnx": m.onnx, "recipe": r.source, **spec.calibration},
                              cell=cell)
                    jobs.append(cal)
                    deps.append(cal.id)
                    cal_key = cal.key
                model_job = Job(f"transform:{m.name}/{r.name}", "transform",
                                _digest({"k": "transform", "dense": export.key, "recipe": rec, "cal": cal_key}),
                                {"recipe": r.source}, tuple(deps), cell)
                jobs.append(model_job)
            for ev, settings in spec.evaluations.items():
                data = settings.get("data") if ev == "perplexity" else None
                content = source_fingerprint(data) if data and Path(data).is_file() else None  # a text file
                deps = tuple(dict.fromkeys([model_job.id, export.id]))  # the dense export: tokenizer, bench baseline
                jobs.append(Job(f"evaluate:{m.name}/{r.name}/{ev}", "evaluate",
                                _digest({"k": ev, "model": model_job.key, "dense": export.key, "s": settings,
                                         "data": content, "threads": spec.threads}),
                                {"evaluation": ev, "settings": settings, "threads": spec.threads}, deps, cell))
    return jobs


# ------------------------------------------------------------------------------------------ running
def entry(root: str | os.PathLike, job: Job) -> Path:
    suffix = ".json" if job.kind == "evaluate" else ""
    return Path(root) / CACHE / job.kind / f"{job.key}{suffix}"


def cached(root, job: Job) -> dict | None:
    """The job's result when its cache entry exists (complete: entries appear atomically), else None."""
    from nm_onnx.io import read_manifest

    if job.kind == "export" and job.params["onnx"]:
        return {"dir": job.params["source"]}
    p = entry(root, job)
    if job.kind == "evaluate":
        try:
            return json.loads(p.read_text())["result"]
        except (OSError, ValueError, KeyError):
            return None
    mark = read_manifest(p)
    return {"dir": str(p)} if mark is not None and mark.get("kind") in ("export", "calibration", "transform") else None


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
    if job.kind == "transform":
        from nm_onnx.transform import transform

        dense = deps[job.deps[0]]["dir"]
        cal = deps[job.deps[1]]["dir"] if len(job.deps) > 1 else None
        transform(dense, out, job.params["recipe"], calibration=cal, overwrite=fresh)
        return "computed", {"dir": str(out)}
    if job.kind == "evaluate":
        from nm_onnx.io import write_json

        model = deps[job.deps[0]]["dir"]
        dense = deps[job.deps[-1]]["dir"]
        result = evaluate(job.params["evaluation"], job.params["settings"], model, dense, job.params["threads"])
        write_json(out, {"job": job.id, "result": result})
        return "computed", result
    raise NmOnnxError(f"unknown job kind {job.kind!r}")


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
        from nm_onnx.data import bos_id, eval_windows, load_eval_text, tokenize
        from nm_onnx.evaluation.perplexity import perplexity_onnx
        from nm_onnx.models import check_context

        check_context(dense, s["seqlen"], "evaluations.perplexity.seqlen")
        text = load_eval_text(s["data"])
        windows = eval_windows(tokenize(tok, text.text), s["seqlen"], s["windows"] or None, bos_id(tok, "auto"))
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


def cells(spec: SweepSpec) -> list[tuple[ModelEntry, RecipeEntry]]:
    return [(m, r) for m in spec.models for r in spec.recipes]
