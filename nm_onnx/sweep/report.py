"""The sweep's report: one row per model x recipe, one column per metric, deltas vs the model's dense row.

`table(spec, jobs, outcomes)` gathers the evaluation jobs' metrics into rows (JSON-ready);
`markdown(report)` renders them. A cell whose job failed (or was skipped because a job it needs
failed) holds that job's one-line error instead of a number.
"""

from __future__ import annotations

from nm_onnx.sweep.jobs import Job
from nm_onnx.sweep.spec import DENSE, SweepSpec


def table(spec: SweepSpec, jobs: list[Job], outcomes: dict[str, dict]) -> dict:
    rows = []
    for m in spec.models:
        for r in spec.recipes:
            row = {"model": m.name, "recipe": r.name, "recipe_source": r.source, "kind": r.kind, "metrics": {},
                   "errors": {}, "info": {}, "notes": []}
            for job in jobs:
                if job.cell != (m.name, r.name):
                    continue
                o = outcomes[job.id]
                if job.kind == "autotune" and "result" in o:  # the chosen recipe's verified numbers
                    row["info"].update({k: v for k, v in o["result"].items() if k not in ("dir", "note", "recipe")})
                    row["notes"] += [o["result"]["note"]] if "note" in o["result"] else []
                if job.kind != "evaluate":
                    continue
                ev = job.params["evaluation"]
                if "result" in o:
                    row["metrics"].update({f"{ev}.{k}": v for k, v in o["result"].items()})
                else:
                    row["errors"][ev] = o["error"]
            rows.append(row)
    for row in rows:
        dense = next(x for x in rows if x["model"] == row["model"] and x["recipe"] == DENSE)
        row["deltas"] = ({} if row is dense else
                         {k: v - dense["metrics"][k] for k, v in row["metrics"].items() if k in dense["metrics"]
                          and not k.endswith("_speedup")})
    columns = []
    for row in rows:
        columns += [k for k in row["metrics"] if k not in columns]
    for ev in spec.evaluations:  # an evaluation that failed everywhere still gets its column
        if not any(c.startswith(ev + ".") for c in columns):
            columns.append(ev)
    counts: dict[str, int] = {}
    for o in outcomes.values():
        counts[o["status"]] = counts.get(o["status"], 0) + 1
    return {"columns": columns, "rows": rows, "jobs": counts, "evaluations": spec.evaluations,
            "job_status": {j.id: outcomes[j.id]["status"] for j in jobs}}


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) >= 1000 else f"{v:.4f}" if abs(v) < 10 else f"{v:.3f}"


def _cell(row: dict, col: str) -> str:
    ev = col.split(".", 1)[0]
    if col in row["metrics"]:
        s = _fmt(row["metrics"][col])
        if col in row["deltas"]:
            s += f" ({row['deltas'][col]:+.4g})"
        return s
    if ev in row["errors"]:
        return "error: " + row["errors"][ev].replace("|", "\\|")
    return "–"


def markdown(report: dict, title: str = "nm-onnx sweep") -> str:
    cols = report["columns"]
    lines = [f"# {title}", "", "| model | recipe | " + " | ".join(cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for row in report["rows"]:
        lines.append(f"| {row['model']} | {row['recipe']} | " + " | ".join(_cell(row, c) for c in cols) + " |")
    settings = "; ".join(f"{ev}: " + ", ".join(f"{k}={v}" for k, v in s.items())
                         for ev, s in report["evaluations"].items())
    jobs = ", ".join(f"{n} {k}" for k, n in sorted(report["jobs"].items()))
    lines += ["", ("Values with their difference to the same model's dense row in parentheses (ppl: lower is "
                   "better; *_speedup: vs dense, > 1 is faster; twin: the PyTorch reference simulation and ORT on "
                   "the same windows; ppl_torch of a weight-pruning row: the PyTorch reference, the only runtime "
                   "it has)."), f"Settings: {settings}.", f"Jobs: {jobs}."]
    notes = [f"- {row['model']} / {row['recipe']}: {n}" for row in report["rows"] for n in row.get("notes", [])]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)
