"""`nm-onnx demo`: the whole chain on the embedded default model, one comparison table and one plot.

export -> calibrate (small budget) -> transform a grid of recipes -> perplexity through ORT next to
the PyTorch twin (the reference simulation of the same recipe) -> prefill/decode speed against the
dense model (interleaved, medians) -> runs/demo/report.md, report.json and ppl_vs_pattern.png.

Grid: dense; 2:4, 8:16, 16:32 magnitude; 8:16 with median shift, variance correction and learned
shift; 8:16 weight pruning (the reference's baseline, PyTorch only). Every row is produced as far as
its pieces exist: a row whose transform or calibration fails keeps its PyTorch numbers and says why.
Defaults are sized to finish in under 20 minutes on an idle 2-core CPU: 8 windows x 512 tokens of
WikiText-2 test (the PyTorch twin on the first window only), calibration 16 x 256 tokens, bench
128-token prompt + 32 decode steps, 5 interleaved repeats.
Per-row results are cached in OUT/results/ (keyed by the settings); --fresh recomputes everything.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from nm_onnx.commands._args import at_least, non_negative, positive
from nm_onnx.models import DEFAULT_MODEL

NAME = "demo"
HELP = "Run the whole chain (export, calibrate, transform a grid, evaluate, bench) on the embedded model."


@dataclass(frozen=True)
class Config:
    name: str  # row label
    recipe: str | None  # preset name (None: dense)
    kind: str = "activation"  # activation | dense | weight


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
    p.add_argument("--only", default=None, help="comma-separated subset of recipes (e.g. 8:16-magnitude)")
    p.add_argument("--fresh", action="store_true", help="recompute cached rows and sparse models")
    p.add_argument("--threads", type=positive, default=None, help="ORT intra-op threads (default: ORT's)")


def _step(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


class Demo:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.t0 = time.time()

    # ------------------------------------------------------------------ pieces
    def setup(self):
        from nm_onnx.data import bos_id, eval_windows, load_eval_text, tokenize
        from nm_onnx.export import export
        from nm_onnx.graph import find_linear_sites, load_model
        from nm_onnx.models import load_hf_model
        from nm_onnx.runtime import make_session

        a = self.args
        _step(f"model {a.model}: fetch + load (PyTorch)")
        self.model, self.tok = load_hf_model(a.model)
        self.dense_dir = self.out / "dense"
        if not (self.dense_dir / "model.onnx").is_file():
            _step("export to ONNX (optimum, KV cache)")
            export(a.model, self.dense_dir)
        _step("inspect: linear sites")
        sites = find_linear_sites(load_model(self.dense_dir))
        self.site_counts = dict(Counter(s.kind for s in sites))
        self.text = load_eval_text(a.data)
        self.bos = bos_id(self.tok, "auto")
        self.windows = eval_windows(tokenize(self.tok, self.text.text), a.seqlen, a.limit or None, self.bos)
        self.dense_sess = make_session(self.dense_dir, threads=a.threads)
        self.key = json.dumps({k: getattr(a, k) for k in ("model", "limit", "seqlen", "data", "calib_samples",
                                                         "calib_seqlen", "prompt", "decode", "repeats",
                                                         "twin_limit", "threads")}, sort_keys=True)

    def cached(self, cfg: Config) -> dict | None:
        p = self.out / "results" / f"{_slug(cfg.name)}.json"
        if self.args.fresh or not p.is_file():
            return None
        try:
            d = json.loads(p.read_text())
        except ValueError:
            return None
        return d["row"] if d.get("key") == self.key else None

    def save(self, cfg: Config, row: dict) -> None:
        from nm_onnx.io import atomic_file

        with atomic_file(self.out / "results" / f"{_slug(cfg.name)}.json") as f:
            json.dump({"key": self.key, "row": row}, f, indent=2)

    def ppl_ort(self, path, label) -> tuple[dict, object]:
        """ORT perplexity on all windows, and on the twin's windows alone (for a like-for-like pair)."""
        import math

        from nm_onnx.evaluation.perplexity import perplexity_onnx
        from nm_onnx.runtime import make_session

        sess = self.dense_sess if path == self.dense_dir else make_session(path, threads=self.args.threads)
        _step(f"{label}: ORT perplexity on {self.windows.shape[0]} x {self.windows.shape[1]}")
        k = self.twin_windows()
        head = perplexity_onnx(sess, self.windows[:k], desc=f"{label} (ORT)") if k else None
        rest = perplexity_onnx(sess, self.windows[k:], desc=f"{label} (ORT)") if k < len(self.windows) else None
        parts = [r for r in (head, rest) if r is not None]
        nll = sum(r.nll * r.tokens for r in parts) / sum(r.tokens for r in parts)
        return {"ppl_ort": math.exp(nll), "ppl_ort_twin_windows": head.perplexity if head else None}, sess

    def twin_windows(self) -> int:
        return max(0, min(self.args.twin_limit, len(self.windows)))

    def ppl_torch(self, label):
        from nm_onnx.reference.perplexity import nll_torch

        k = self.twin_windows()
        if not k:
            return None
        _step(f"{label}: PyTorch twin perplexity on {k} windows")
        return nll_torch(self.model, self.windows[:k], progress=True, desc=f"{label} (torch)").perplexity

    def calibration(self, recipe):
        """Artifact directory for a recipe that needs one (small budget), else None."""
        from nm_onnx.calibration import calibrate, load_artifact
        from nm_onnx.data import calibration_windows, load_calibration_text, tokenize
        from nm_onnx.recipe import SparsityRecipe

        rec = SparsityRecipe.load(recipe)
        if not rec.needs_calibration:
            return None, None
        a = self.args
        out = self.out / "calibration" / f"{recipe}-{a.calib_samples}x{a.calib_seqlen}"  # keyed by the budget
        if out.is_dir() and not a.fresh:
            try:
                return out, load_artifact(out)
            except Exception as e:  # noqa: BLE001 - stale or partial: recompute
                _step(f"cached calibration {out} unusable ({type(e).__name__}); recomputing")
        rec.calibration.update(samples=a.calib_samples, seqlen=a.calib_seqlen)
        text = load_calibration_text(rec.calibration["data"])
        windows = calibration_windows(tokenize(self.tok, text.text), a.calib_samples, a.calib_seqlen,
                                      rec.calibration["seed"], self.bos)
        _step(f"calibrate {recipe} on {a.calib_samples} x {a.calib_seqlen} tokens of {text.source}")
        art = calibrate(self.model, rec, windows, out, data_source=text.source, model_source=str(a.model),
                        bos=self.bos)
        return out, art

    def sparse_model(self, recipe, calibration) -> Path:
        from nm_onnx.transform import transform

        # a calibrated model is keyed by its artifact (budget), so a new budget never reuses a stale model
        out_dir = self.out / "sparse" / (recipe if calibration is None else Path(calibration).name)
        path = out_dir / "model.onnx"
        if path.is_file() and not self.args.fresh:
            return out_dir
        _step(f"transform {recipe}")
        transform(self.dense_dir, out_dir, recipe, calibration=calibration)  # dir in: dir out, atomic
        return out_dir

    def bench(self, sess, label) -> dict:
        from nm_onnx.evaluation.latency import measure, paired_speedup

        a = self.args
        if a.repeats < 1:
            return {}
        _step(f"{label}: bench vs dense (prompt {a.prompt}, decode {a.decode}, {a.repeats} repeats, interleaved)")
        r = measure({"dense": self.dense_sess, "sparse": sess}, a.prompt, a.decode, a.repeats, 1)
        out = {"prefill_tok_s": r["sparse"]["prefill_tok_s"], "dense_prefill_tok_s": r["dense"]["prefill_tok_s"],
               **paired_speedup(r["sparse"], r["dense"])}
        if "decode_tok_s" in r["sparse"]:
            out.update(decode_tok_s=r["sparse"]["decode_tok_s"], dense_decode_tok_s=r["dense"]["decode_tok_s"])
        return out

    # ------------------------------------------------------------------ rows
    def row(self, cfg: Config) -> dict:
        from nm_onnx.recipe import SparsityRecipe
        from nm_onnx.reference import apply_weight_pruning, sparsify_model, unsparsify_model

        row: dict = {"config": cfg.name, "recipe": cfg.recipe, "kind": cfg.kind, "notes": []}
        if cfg.kind == "dense":
            row["sparsity"] = 0.0
            ppl, _ = self.ppl_ort(self.dense_dir, "dense")
            row.update(ppl)
            row["ppl_torch"] = self.ppl_torch("dense")
            return row
        if cfg.kind == "weight":
            from nm_onnx.recipe import parse_pattern

            row["sparsity"] = parse_pattern(cfg.recipe)[2]
            import torch

            saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            try:
                apply_weight_pruning(self.model, cfg.recipe, "magnitude")
                _step(f"{cfg.name}: PyTorch perplexity (weights pruned {cfg.recipe}, reference)")
                from nm_onnx.reference.perplexity import nll_torch

                row["ppl_torch"] = nll_torch(self.model, self.windows, progress=True, desc=cfg.name).perplexity
            finally:
                with torch.no_grad():
                    self.model.load_state_dict(saved)
            row["notes"].append("PyTorch reference only (weights pruned, dense kernels)")
            return row
        rec = SparsityRecipe.load(cfg.recipe)
        row["sparsity"] = rec.sparsity
        try:
            cal_dir, artifact = self.calibration(cfg.recipe)
        except Exception as e:  # noqa: BLE001 - keep the row, say why
            _step(f"{cfg.name}: calibration failed: {type(e).__name__}: {e}")
            row["notes"].append(f"calibration failed: {type(e).__name__}: {str(e)[:120]}")
            return row
        try:
            sparse_dir = self.sparse_model(cfg.recipe, cal_dir)
            ppl, sess = self.ppl_ort(sparse_dir, cfg.name)
            row.update(ppl)
            row.update(self.bench(sess, cfg.name))
        except ImportError:
            row["notes"].append("transform not available yet (nm_onnx.transform)")
        except Exception as e:  # noqa: BLE001 - keep the row, say why
            _step(f"{cfg.name}: ONNX path failed: {type(e).__name__}: {e}")
            traceback.print_exc(limit=3)
            row["notes"].append(f"ONNX path failed: {type(e).__name__}: {str(e)[:120]}")
        if self.twin_windows():
            sparsify_model(self.model, rec, artifact)
            try:
                row["ppl_torch"] = self.ppl_torch(cfg.name)
            finally:
                unsparsify_model(self.model)
        return row

    def run(self) -> int:
        from nm_onnx.errors import NmOnnxError

        only = None
        if self.args.only:
            only = {s.strip() for s in self.args.only.split(",")}
            known = {c.recipe for c in GRID if c.recipe}
            bad = only - known
            if bad:
                raise NmOnnxError(f"--only: unknown {sorted(bad)}; choose from {sorted(known)}")
        claim_demo_dir(self.out)
        self.setup()
        rows = []
        grid = [c for c in GRID if only is None or c.kind == "dense" or c.recipe in only]
        for i, cfg in enumerate(grid, 1):
            _step(f"row {i}/{len(grid)}: {cfg.name} ({time.time() - self.t0:.0f} s elapsed)")
            row = self.cached(cfg)
            if row is None:
                row = self.row(cfg)
                self.save(cfg, row)
            else:
                _step(f"{cfg.name}: cached")
            rows.append(row)
        self.write(rows)
        _step(f"done in {time.time() - self.t0:.0f} s; report: {self.out / 'report.md'}")
        return 0

    # ------------------------------------------------------------------ report
    def write(self, rows: list[dict]) -> None:
        from nm_onnx.evaluation.latency import cpu_info
        from nm_onnx.io import atomic_file, atomic_path

        a = self.args
        report = demo_markdown(rows, {
            "model": a.model, "sites": self.site_counts, "data": self.text.source,
            "windows": int(self.windows.shape[0]), "seqlen": int(self.windows.shape[1]),
            "calibration": f"{a.calib_samples} x {a.calib_seqlen} tokens",
            "bench": f"prompt {a.prompt} tokens, decode {a.decode} steps, median of {a.repeats} interleaved repeats",
            "machine": cpu_info(), "seconds": time.time() - self.t0, "twin": self.twin_windows(),
        })
        print(report)
        with atomic_file(self.out / "report.md") as f:
            f.write(report + "\n")
        with atomic_file(self.out / "report.json") as f:
            json.dump({"rows": rows, "sites": self.site_counts, "settings": json.loads(self.key)}, f, indent=2)
        with atomic_path(self.out / "ppl_vs_pattern.png") as tmp:
            plot(rows, tmp)


def claim_demo_dir(out: Path) -> None:
    """Make `out` the demo's folder: a new or empty one (marked), or one an earlier demo marked."""
    from nm_onnx.errors import NmOnnxError
    from nm_onnx.io import check_parent_writable, read_manifest, write_manifest

    if out.exists() and not out.is_dir():
        raise NmOnnxError(f"--out '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        mark = read_manifest(out)
        if mark is None or mark.get("kind") != "demo":
            raise NmOnnxError(
                f"--out '{out}' is not empty and is not a folder an earlier `nm-onnx demo` made; "
                "choose another --out (a new or empty folder)"
            )
        return
    check_parent_writable(out)
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
            f"| {r['config']} | {_f(100 * r['sparsity'], '.0f', '%')} | {_f(shown, '.3f')}{mark} | "
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
              "reference's 8:16 magnitude weight pruning, PyTorch on all windows.")]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def plot(rows: list[dict], path) -> None:
    """Perplexity vs N:M pattern (magnitude), dense line, 8:16 mitigations and weight pruning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def ppl(r):
        return r.get("ppl_ort") if r.get("ppl_ort") is not None else r.get("ppl_torch")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pats = [("2:4 magnitude", "2:4"), ("8:16 magnitude", "8:16"), ("16:32 magnitude", "16:32")]
    by = {r["config"]: r for r in rows}
    xs = [(lbl, ppl(by[c])) for c, lbl in pats if c in by and ppl(by[c]) is not None]
    pos = {"2:4": 0, "8:16": 1, "16:32": 2}
    if xs:
        ax.plot([pos[x] for x, _ in xs], [y for _, y in xs], "o-", label="magnitude")
    dense = by.get("dense")
    if dense and ppl(dense) is not None:
        ax.axhline(ppl(dense), color="gray", ls="--", label=f"dense {ppl(dense):.2f}")
    markers = iter("s^Dvx")
    for r in rows:
        if r["config"].startswith("8:16") and r["config"] != "8:16 magnitude" and ppl(r) is not None:
            ax.plot([pos["8:16"]], [ppl(r)], next(markers, "o"), label=r["config"], ms=8)
    ax.set_xticks(list(pos.values()), list(pos))
    ax.set_xlabel("N:M activation pattern (50% sparsity)")
    ax.set_ylabel("WikiText-2 perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_title("nm-onnx demo: perplexity vs pattern")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def run(args) -> int:
    return Demo(args).run()
