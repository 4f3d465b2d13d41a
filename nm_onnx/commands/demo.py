"""`nm-onnx demo`: the whole chain on the embedded default model, one comparison table and one plot.

The demo is the sweep (nm_onnx.sweep) of a built-in spec, written to OUT/spec.toml (rerun or edit it
with `nm-onnx sweep`): export -> calibrate (small budget) or autotune -> transform a grid of recipes
-> perplexity through ORT next to the PyTorch twin (the reference simulation of the same recipe) ->
prefill/decode speed against the dense model (interleaved, medians) -> OUT/report.md, report.json and
ppl_vs_pattern.png.

Grid: dense; 2:4, 8:16, 16:32 magnitude; 8:16 with median shift, variance correction and learned
shift; 8:16 weight pruning (the reference's baseline, PyTorch only); the autotuned recipes within
+5%, +10% and +25% perplexity (`nm-onnx autotune`, one shared sensitivity and speed table). Every row
is produced as far as its pieces exist: a row whose transform or calibration fails keeps its other
numbers and says why. Defaults: 8 windows x 512 tokens of WikiText-2 test (the PyTorch twin on the
first window only), calibration 16 x 256 tokens, bench 128-token prompt + 32 decode steps, 5
interleaved repeats; the uniform rows take about 15 minutes on an idle 2-core CPU, the autotune rows
about 20 more (`--autotune none` leaves them out).
Every job's result is cached by content in OUT/cache (as in a sweep); --fresh recomputes everything.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from nm_onnx.autotune.spec import DEFAULT_CANDIDATES
from nm_onnx.commands._args import at_least, non_negative, positive
from nm_onnx.models import DEFAULT_MODEL

NAME = "demo"
HELP = "Run the whole chain (export, calibrate, transform a grid, evaluate, bench) on the embedded model."
AUTOTUNE_BUDGETS = "5%,10%,25%"


@dataclass(frozen=True)
class Config:
    name: str  # row label
    recipe: str | None  # preset name (None: dense); the pattern of a weight row; the budget of an autotune row
    kind: str = "activation"  # activation | dense | weight | autotune

    @property
    def source(self) -> str:
        """The sweep spec's recipe source of this row."""
        return {"dense": "dense", "weight": f"weight:{self.recipe}", "autotune": f"autotune:{self.recipe}"}.get(
            self.kind, self.recipe)

    @property
    def key(self) -> str:
        """The row's name for --only."""
        return f"autotune:{self.recipe}" if self.kind == "autotune" else self.recipe


GRID = (
    Config("dense", None, "dense"),
    Config("2:4 magnitude", "2:4-magnitude"),
    Config("8:16 magnitude", "8:16-magnitude"),
    Config("16:32 magnitude", "16:32-magnitude"),
    Config("8:16 + median shift", "8:16-median-shift"),
    Config("8:16 + variance correction", "8:16-variance"),
    Config("8:16 + learned shift", "8:16-learned-shift"),
    Config("8:16 weight pruning (magnitude)", "8:16", "weight"),
)


def add_arguments(p):
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model source (default {DEFAULT_MODEL})")
    p.add_argument("--export", default=None, help="an existing dense ONNX export of --model (default: exported)")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--limit", type=non_negative, default=8, help="perplexity windows (default 8; 0 = all)")
    p.add_argument("--seqlen", type=at_least(2), default=512, help="tokens per perplexity window (default 512)")
    p.add_argument("--data", default="wikitext2")
    p.add_argument("--calib-samples", type=positive, default=16, help="calibration windows (default 16)")
    p.add_argument("--calib-seqlen", type=at_least(2), default=256, help="calibration window length (default 256)")
    p.add_argument("--prompt", type=positive, default=128, help="bench prompt tokens (default 128)")
    p.add_argument("--decode", type=non_negative, default=32, help="bench decode steps (default 32; 0 = skip)")
    p.add_argument("--repeats", type=non_negative, default=5, help="bench repeats (default 5; 0 = no bench)")
    p.add_argument("--twin-limit", type=non_negative, default=1,
                   help="windows for the PyTorch twin (default 1: the reference simulation is slow; 0 = skip)")
    p.add_argument("--autotune", default=AUTOTUNE_BUDGETS,
                   help=f"perplexity budgets of the autotuned rows (default {AUTOTUNE_BUDGETS}; none = no autotune)")
    p.add_argument("--autotune-samples", type=positive, default=8,
                   help="calibration windows of the autotune sensitivity (default 8)")
    p.add_argument("--only", default=None,
                   help="comma-separated subset of rows (e.g. 8:16-magnitude,autotune:+5%%; dense always runs)")
    p.add_argument("--fresh", action="store_true", help="recompute cached rows and sparse models")
    p.add_argument("--threads", type=positive, default=None, help="ORT intra-op threads (default: ORT's)")


def _step(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def grid(args) -> list[Config]:
    """The rows this run makes: the grid, the autotune budgets, filtered by --only (dense always)."""
    from nm_onnx.autotune.spec import parse_budget
    from nm_onnx.errors import NmOnnxError

    rows = list(GRID)
    if args.autotune.strip().lower() not in ("", "none"):
        for b in args.autotune.split(","):
            try:
                budget = str(parse_budget(b))
            except NmOnnxError as e:
                raise NmOnnxError(f"--autotune: {e}") from None
            rows.append(Config(f"autotune {budget}", budget, "autotune"))
    if not args.only:
        return rows
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    try:
        only = {f"autotune:{parse_budget(o.split(':', 1)[1])}" if o.startswith("autotune:") else o for o in only}
    except NmOnnxError as e:
        raise NmOnnxError(f"--only: {e}") from None
    known = {c.key for c in rows if c.kind != "dense"}
    bad = only - known
    if bad:
        raise NmOnnxError(f"--only: unknown {sorted(bad)}; choose from {sorted(known)}")
    return [c for c in rows if c.kind == "dense" or c.key in only]


def spec_text(args, rows: list[Config]) -> str:
    """The built-in sweep spec of this demo run (TOML)."""
    def q(v):
        return json.dumps(str(v))

    data = args.data if args.data == "wikitext2" else str(Path(args.data).resolve())
    model = args.model if not Path(args.model).exists() else str(Path(args.model).resolve())
    lines = [f"# nm-onnx demo: the built-in spec of this run (`nm-onnx sweep` runs it too; {time.strftime('%Y-%m-%d')})"]
    if args.threads:
        lines.append(f"threads = {args.threads}")
    entry = f"name = {q(Path(model).name)}, source = {q(model)}"
    if args.export:
        entry += f", export = {q(Path(args.export).resolve())}"
    lines.append(f"models = [{{{entry}}}]")
    lines.append("recipes = [" + ", ".join(f"{{name = {q(c.name)}, source = {q(c.source)}}}"
                                          for c in rows if c.kind != "dense") + "]")
    lines += ["", "[calibration]", f"samples = {args.calib_samples}", f"seqlen = {args.calib_seqlen}"]
    if any(c.kind == "autotune" for c in rows):
        lines += ["", "[autotune]", f"samples = {args.autotune_samples}", f"limit = {args.limit or 8}",
                  f"eval_seqlen = {args.seqlen}", f"eval_data = {q(data)}", f"prompt = {args.prompt}",
                  f"decode = {max(1, args.decode)}", f"repeats = {max(1, min(3, args.repeats))}"]
    lines += ["", "[evaluations.perplexity]", f"windows = {args.limit}", f"seqlen = {args.seqlen}", f"data = {q(data)}"]
    if args.twin_limit:
        lines += ["", "[evaluations.twin]", f"windows = {args.twin_limit}", f"seqlen = {args.seqlen}",
                  f"data = {q(data)}"]
    if args.repeats:
        lines += ["", "[evaluations.bench]", f"prompt = {args.prompt}", f"decode = {args.decode}",
                  f"repeats = {args.repeats}"]
    return "\n".join(lines) + "\n"


def demo_rows(rep: dict, rows: list[Config]) -> list[dict]:
    """The sweep's report rows as the demo's rows (config, kind, sparsity, perplexities, speedups, notes)."""
    from nm_onnx.recipe import SparsityRecipe, parse_pattern

    by = {r["recipe"]: r for r in rep["rows"]}
    out = []
    for c in rows:
        r = by["dense" if c.kind == "dense" else c.name]
        m = r["metrics"]
        row = {"config": c.name, "recipe": c.recipe, "kind": c.kind, "notes": list(r["notes"])}
        row["sparsity"] = (0.0 if c.kind == "dense" else parse_pattern(c.recipe)[2] if c.kind == "weight" else
                           r["info"].get("sparsity") if c.kind == "autotune" else SparsityRecipe.load(c.recipe).sparsity)
        if c.kind == "weight":
            row["ppl_torch"] = m.get("perplexity.ppl_torch")
            row["notes"].append("PyTorch reference only (weights pruned, dense kernels)")
        else:
            row.update(ppl_ort=m.get("perplexity.ppl"), ppl_ort_twin_windows=m.get("twin.ppl_ort"),
                       ppl_torch=m.get("twin.ppl_torch"))
        if c.kind != "dense" and any(k.startswith("bench.") for k in m):
            dense = by["dense"]["metrics"]
            row.update({k: m[f"bench.{k}"] for k in ("prefill_speedup", "decode_speedup", "prefill_tok_s",
                                                     "decode_tok_s") if f"bench.{k}" in m})
            row.update({f"dense_{k}": dense[f"bench.{k}"] for k in ("prefill_tok_s", "decode_tok_s")
                        if f"bench.{k}" in dense})
        if c.kind == "autotune":
            row["autotune"] = r["info"]
        row["notes"] += [f"{ev}: {e}" for ev, e in r["errors"].items()]
        out.append(row)
    return out


class Demo:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.t0 = time.time()

    def run(self) -> int:
        from nm_onnx.io import atomic_file
        from nm_onnx.sweep import execute
        from nm_onnx.sweep.spec import load_spec

        a = self.args
        rows = grid(a)
        text = spec_text(a, rows)
        with tempfile.TemporaryDirectory() as tmp:  # the spec is checked before the folder is touched
            (Path(tmp) / "spec.toml").write_text(text)
            spec = load_spec(Path(tmp) / "spec.toml")
        claim_demo_dir(self.out, spec.inputs()[1:])  # [0] is the temporary spec
        with atomic_file(self.out / "spec.toml") as f:
            f.write(text)
        spec.path = self.out / "spec.toml"
        _step(f"{len(rows)} rows on {a.model}: the sweep of {self.out / 'spec.toml'}")
        rep, outcomes = execute(spec, self.out, fresh=a.fresh)
        dense_dir = next((o["result"]["dir"] for j, o in outcomes.items() if j.startswith("export:") and "result" in o),
                         None)
        self.write(demo_rows(rep, rows), dense_dir, rep)
        _step(f"done in {time.time() - self.t0:.0f} s; report: {self.out / 'report.md'}")
        return 0

    # ------------------------------------------------------------------ report
    def write(self, rows: list[dict], dense_dir, rep: dict) -> None:
        from nm_onnx.data import bos_id, eval_windows, load_eval_text, tokenize
        from nm_onnx.evaluation.latency import cpu_info
        from nm_onnx.evaluation.tokenizer import load_tokenizer
        from nm_onnx.graph import find_linear_sites, load_model
        from nm_onnx.io import atomic_file, atomic_path

        a = self.args
        sites, windows, source = {}, 0, a.data
        if dense_dir is not None:  # the table's header: what was measured on what
            sites = dict(Counter(s.kind for s in find_linear_sites(load_model(dense_dir))))
            tok = load_tokenizer(dense_dir)
            text = load_eval_text(a.data)
            source = text.source
            windows = eval_windows(tokenize(tok, text.text), a.seqlen, a.limit or None, bos_id(tok, "auto")).shape[0]
        report = demo_markdown(rows, {
            "model": a.model, "sites": sites, "data": source, "windows": int(windows), "seqlen": a.seqlen,
            "calibration": f"{a.calib_samples} x {a.calib_seqlen} tokens",
            "bench": f"prompt {a.prompt} tokens, decode {a.decode} steps, median of {a.repeats} interleaved repeats",
            "machine": cpu_info(), "seconds": time.time() - self.t0, "twin": a.twin_limit,
        })
        print(report)
        with atomic_file(self.out / "report.md") as f:
            f.write(report + "\n")
        with atomic_file(self.out / "report.json") as f:
            json.dump({"rows": rows, "sites": sites, "settings": {k: getattr(a, k) for k in (
                "model", "limit", "seqlen", "data", "calib_samples", "calib_seqlen", "prompt", "decode", "repeats",
                "twin_limit", "autotune", "threads")}, "jobs": rep["jobs"]}, f, indent=2)
        with atomic_path(self.out / "ppl_vs_pattern.png") as tmp:
            plot(rows, tmp)


def claim_demo_dir(out: Path, inputs=()) -> None:
    """Make `out` the demo's folder: a new or empty one (marked), or one an earlier demo marked; never
    one that is, contains or lies inside an input (the model, its export, the text)."""
    from nm_onnx.errors import NmOnnxError
    from nm_onnx.io import check_output_dir, read_manifest, write_manifest

    check_output_dir(out, "demo", inputs, overwrite=True, option="--out")  # inputs, type, writable parent
    if out.is_dir() and any(out.iterdir()):
        mark = read_manifest(out)
        if mark is None or mark.get("kind") != "demo":
            raise NmOnnxError(
                f"--out '{out}' is not empty and is not a folder an earlier `nm-onnx demo` made; "
                "choose another --out (a new or empty folder)"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, "demo")


def _f(v, fmt=".2f", suffix=""):
    return "–" if v is None else f"{v:{fmt}}{suffix}"


def demo_markdown(rows: list[dict], meta: dict) -> str:
    dense = next((r.get("ppl_ort") or r.get("ppl_torch") for r in rows if r["kind"] == "dense"), None)
    lines = [
        "# nm-onnx demo",
        "",
        f"model: {meta['model']}; linear sites: " + ", ".join(f"{k}={v}" for k, v in sorted(meta["sites"].items())),
        f"perplexity: {meta['data']}; {meta['windows']} windows x {meta['seqlen']} tokens (non-overlapping)",
        f"calibration budget: {meta['calibration']} (small demo budget; the paper uses 256 x 512)",
        f"speed: {meta['bench']}; {meta['machine']}, ONNX Runtime CPU",
        f"total time: {meta['seconds']:.0f} s",
        "",
        "| config | sparsity | perplexity | Δ vs dense | torch twin | decode speedup | prefill speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        ppl = r.get("ppl_ort")
        shown = ppl if ppl is not None else r.get("ppl_torch") if r["kind"] == "weight" else None
        delta = None if shown is None or dense is None or r["kind"] == "dense" else shown - dense
        mark = " (torch)" if ppl is None and shown is not None else ""
        twin = _f(r.get("ppl_torch"), ".3f")
        if r.get("ppl_torch") is not None and r.get("ppl_ort_twin_windows") is not None:
            twin += f" (ORT {r['ppl_ort_twin_windows']:.3f})"
        elif r["kind"] == "weight":
            twin = "(row is torch)"
        lines.append(
            f"| {r['config']} | {_f(None if r['sparsity'] is None else 100 * r['sparsity'], '.0f', '%')} | "
            f"{_f(shown, '.3f')}{mark} | "
            f"{_f(delta, '+.3f')} | {twin} | {_f(r.get('decode_speedup'), '.2f', 'x')} | "
            f"{_f(r.get('prefill_speedup'), '.2f', 'x')} |"
        )
        notes += [f"- {r['config']}: {n}" for n in r.get("notes", [])]
    lines += ["", ("perplexity: ONNX Runtime with the nm-onnx op library, all windows. torch twin: the PyTorch "
              f"reference simulation of the same recipe on the first {meta['twin']} window(s), next to ORT's "
              "perplexity on exactly those windows. Dense agrees to ~1e-6; a masked model is chaotic (float "
              "noise of 1e-4 upstream flips a few mask entries and the change cascades: on SmolLM2 a 1e-6 "
              "input perturbation moves one window's perplexity by ~3%), so masked rows differ by a few % "
              "per window; `tools/validate.py` checks every site exactly. "
              "Speedups: sparse vs dense ONNX model, median over the repeats of the time ratio of each "
              "back-to-back (dense, sparse) pair (> 1 is faster; decode on this small model runs ~3150 ONNX "
              "nodes per token, most of which sparsity does not touch). Weight pruning: the "
              "reference's 8:16 magnitude weight pruning, PyTorch on all windows. Autotune +B%: the mixed "
              "recipe `nm-onnx autotune` chose for that perplexity budget (per-group patterns from "
              f"{DEFAULT_CANDIDATES}, verified on the same windows; its sparsity is the fraction of "
              "the linear layers' multiply-adds skipped).")]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def plot(rows: list[dict], path) -> None:
    """Left: perplexity vs N:M pattern (magnitude), dense line, 8:16 mitigations, weight pruning.
    Right: perplexity vs decode speedup of every ORT row (the frontier the autotuned rows trace)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ppl(r):
        return r.get("ppl_ort") if r.get("ppl_ort") is not None else r.get("ppl_torch")

    fig, (ax, fx) = plt.subplots(1, 2, figsize=(12, 4.5))
    pats = [("2:4 magnitude", "2:4"), ("8:16 magnitude", "8:16"), ("16:32 magnitude", "16:32")]
    by = {r["config"]: r for r in rows}
    xs = [(lbl, ppl(by[c])) for c, lbl in pats if c in by and ppl(by[c]) is not None]
    pos = {"2:4": 0, "8:16": 1, "16:32": 2}
    if xs:
        ax.plot([pos[x] for x, _ in xs], [y for _, y in xs], "o-", label="magnitude")
    dense = by.get("dense")
    for a in (ax, fx):
        if dense and ppl(dense) is not None:
            a.axhline(ppl(dense), color="gray", ls="--", label=f"dense {ppl(dense):.2f}")
    markers = iter("s^Dvx")
    for r in rows:
        if r["config"].startswith("8:16") and r["config"] != "8:16 magnitude" and ppl(r) is not None:
            ax.plot([pos["8:16"]], [ppl(r)], next(markers, "o"), label=r["config"], ms=8)
    ax.set_xticks(list(pos.values()), list(pos))
    ax.set_xlabel("N:M activation pattern (50% sparsity)")
    ax.set_ylabel("WikiText-2 perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title("perplexity vs pattern")
    ax.legend(fontsize=8)
    for kind, style, label in (("activation", "o", "uniform recipes"), ("autotune", "*-", "autotune (budgets)")):
        pts = sorted((r["decode_speedup"], r["ppl_ort"], r["config"]) for r in rows
                     if r["kind"] == kind and r.get("decode_speedup") and r.get("ppl_ort"))
        if pts:
            fx.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=9 if kind == "autotune" else 6, label=label)
            for x, y, name in pts:
                fx.annotate(name.replace(" magnitude", "").replace("autotune ", ""), (x, y), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
    fx.set_xlabel("decode speedup vs dense (ORT, > 1 is faster)")
    fx.set_ylabel("WikiText-2 perplexity")
    fx.set_yscale("log")
    fx.set_title("frontier: perplexity vs decode speed")
    fx.legend(fontsize=8)
    fig.suptitle("nm-onnx demo")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def run(args) -> int:
    return Demo(args).run()
