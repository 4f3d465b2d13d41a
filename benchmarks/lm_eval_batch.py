"""lm-eval arc_easy through the `nm-onnx` adapter on SmolLM2 8:16: batched vs batch 1 (not a test).

    python benchmarks/lm_eval_batch.py [--limit 200] [--batch-size 16] [--recipe 8:16-magnitude|dense] [--threads 2]

Transforms the cached SmolLM2 export (tests/models_cache.py) with the recipe once (cached beside
it), runs lm-eval arc_easy (0-shot) at batch 1 and at --batch-size on the same ORT session, and
prints both times, the speedup, both accuracies and the largest per-request log-likelihood
differences (the five largest with their doc ids). Results with the machine's load go to benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--limit", type=int, default=200, help="arc_easy items (default 200; 0 = the whole split)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--recipe", default="8:16-magnitude", help="recipe, or 'dense' for the dense export itself")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()

    import lm_eval
    from models_cache import smollm2_export

    from nm_onnx.evaluation.lm_eval_adapter import NmOnnxLM
    from nm_onnx.evaluation.tasks import task_manager
    from nm_onnx.runtime import make_session
    from nm_onnx.transform import transform

    dense = smollm2_export()
    sparse = dense if a.recipe == "dense" else dense.parent / f"smollm2-135m-{a.recipe.replace(':', '-')}"
    if not (sparse / "model.onnx").is_file():
        transform(dense, sparse, a.recipe)
    sess = make_session(sparse, threads=a.threads)
    print(f"load before: {os.getloadavg()}", flush=True)

    def run(bs):
        lm = NmOnnxLM(session=sess, tokenizer=str(dense), batch_size=bs, max_length=2048)
        t = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=["arc_easy"], num_fewshot=0, limit=a.limit or None,
                                      task_manager=task_manager(["arc_easy"]), bootstrap_iters=0,
                                      log_samples=True)
        dt = time.perf_counter() - t
        r = res["results"]["arc_easy"]
        lls = {(s["doc_id"], j): (float(resp[0][0]), s["arguments"][j])
               for s in res["samples"]["arc_easy"] for j, resp in enumerate(s["resps"])}
        return dt, r["acc,none"], r["acc_norm,none"], lls, len(lls)

    t1, acc1, norm1, ll1, n1 = run(1)
    print(f"batch 1: {t1:.1f} s, acc {acc1:.4f}, acc_norm {norm1:.4f}, {n1} requests; load {os.getloadavg()}",
          flush=True)
    tb, accb, normb, llb, nb = run(a.batch_size)
    print(f"batch {a.batch_size}: {tb:.1f} s, acc {accb:.4f}, acc_norm {normb:.4f}, {nb} requests; "
          f"load {os.getloadavg()}", flush=True)
    diffs = sorted(((abs(ll1[k][0] - llb[k][0]), k) for k in ll1), reverse=True)
    print(f"speedup {t1 / tb:.2f}x; max |loglikelihood diff| {diffs[0][0]:.2e}; "
          f"{sum(d > 1e-4 for d, _ in diffs)} of {len(diffs)} requests differ by more than 1e-4; "
          f"accuracies {'identical' if (acc1, norm1) == (accb, normb) else 'DIFFER'}")
    for d, k in diffs[:5]:
        context, continuation = ll1[k][1]
        print(f"  doc {k[0]} choice {k[1]}: {ll1[k][0]:.6f} vs {llb[k][0]:.6f} ({d:.2e}); "
              f"context {len(context)} chars, continuation {continuation!r}")


if __name__ == "__main__":
    main()
