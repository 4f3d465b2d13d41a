"""The autotune report: report.json, report.md and the frontier plot (perplexity vs decode speedup).

The plot puts the uniform presets and every autotuned recipe verified with the same settings (this
run's rounds and, with a shared work directory, other budgets' runs) on the same axes. matplotlib
draws `frontier.png` when it is installed; `frontier.csv` always holds the points. Torch-free.
"""

from __future__ import annotations

import csv
from pathlib import Path

from nm_onnx.evaluation.report import markdown_table


def _f(v, fmt="{:.3f}"):
    return "–" if v is None else fmt.format(v)


def write_frontier(points: list[dict], dense: dict, out_dir: Path) -> list[str]:
    """frontier.csv (+ frontier.png with matplotlib); returns the file names written."""
    rows = [{"label": "dense", "kind": "dense", "perplexity": dense["perplexity"], "decode_speedup": 1.0}]
    rows += [{"label": p["label"], "kind": p.get("kind", "uniform"), "perplexity": p["perplexity"],
              "decode_speedup": p.get("decode_speedup")} for p in points]
    with open(out_dir / "frontier.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["label", "kind", "perplexity", "decode_speedup"])
        w.writeheader()
        w.writerows(rows)
    written = ["frontier.csv"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    style = {"dense": ("k", "s"), "uniform": ("tab:red", "o"), "autotune": ("tab:blue", "D"),
             "autotune-round": ("tab:cyan", "x")}
    for kind, (color, marker) in style.items():
        pts = [r for r in rows if r["kind"] == kind and r["decode_speedup"] is not None]
        if not pts:
            continue
        ax.scatter([r["decode_speedup"] for r in pts], [r["perplexity"] for r in pts], c=color, marker=marker,
                   label=kind)
        for r in pts:
            ax.annotate(r["label"], (r["decode_speedup"], r["perplexity"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("decode speedup vs dense (ORT, measured)")
    ax.set_ylabel("perplexity (ORT, evaluation windows)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "frontier.png", dpi=120)
    plt.close(fig)
    return written + ["frontier.png"]


def markdown(report: dict) -> str:
    r = report
    v = r.get("verified") or {}
    chk = r["sensitivity"]["check"]
    lines = [f"# nm-onnx autotune: {r['model']}", "",
             (f"Budget {r['budget']} perplexity over dense ({r['budget_nll']:.4f} nats/token); candidates "
             f"{', '.join(r['candidates'])}; base recipe {r['base_recipe']}."), "",
             f"Verdict: **{'within' if r['within_budget'] else 'NOT within'} budget**"
             + (f": perplexity {v['perplexity']:.3f} vs dense {r['dense']['perplexity']:.3f} "
                f"({100 * v['relative_perplexity']:+.2f}%), decode speedup {_f(v.get('decode_speedup'), '{:.2f}x')}, "
                f"{v.get('sparse_sites')} sparse sites" if v else ""), "",
             (f"Evaluation: {r['dense']['windows']} x {r['dense']['seqlen']} tokens of {r['eval_data']}; "
             f"sensitivity: {r['sensitivity']['windows']} x {r['sensitivity']['seqlen']} calibration tokens "
             f"({r['sensitivity']['data']}); bench: prompt {r['bench']['prompt']}, decode {r['bench']['decode']}, "
             f"{r['bench']['repeats']} repeats; machine {r['machine']}."), "",
             "## Proxy check", "",
             (f"{chk['pairs']} (group, pattern) pairs measured exactly: Spearman rank correlation of proxy vs true "
             f"loss increase {_f(chk['spearman'])}; scale true/proxy (median) {chk['scale']:.3g}."), "",
             "## Rounds", "",
             markdown_table(["round", "allocation budget (nats)", "predicted Δnll", "verified Δnll", "perplexity",
                             "decode speedup", "sparse groups"],
                            [[i, f"{x['allocation_budget']:.4f}", f"{x['predicted_nll']:.4f}",
                              f"{x['verified']['delta_nll']:.4f}", f"{x['verified']['perplexity']:.3f}",
                              _f(x['verified'].get('decode_speedup'), '{:.2f}x'), x['sparse_groups']]
                             for i, x in enumerate(r["rounds"])]), "",
             "## Uniform presets (same windows, same bench)", "",
             markdown_table(["recipe", "perplexity", "Δ vs dense", "decode speedup"],
                            [[p["label"], f"{p['perplexity']:.3f}", f"{100 * p['relative_perplexity']:+.1f}%",
                              _f(p.get('decode_speedup'), '{:.2f}x')] for p in r["uniform"]]), "",
             "## Groups (chosen recipe)", "",
             markdown_table(["group", "sites", "pattern", "predicted Δnll", "measured Δnll", "saved ms/step"],
                            [[g["group"], g["sites"], g["pattern"], f"{g['predicted_nll']:.5f}",
                              _f(g.get("measured_nll"), "{:.5f}"), f"{g['saved_ms']:.4f}"] for g in r["groups"]])]
    return "\n".join(lines) + "\n"
