"""End-to-end check of a recipe on the deployed path: transform, ORT perplexity, decode speed.

`Verifier.point(recipe)` transforms the dense export with the recipe into the work directory, scores
perplexity through ONNX Runtime + the op library on held-out *evaluation* windows
(`nm_onnx.evaluate`: WikiText-2 raw test by default, `limit` windows of `seqlen` tokens) and runs
`nm_onnx.bench` against the dense export (interleaved, decode speedup = median of paired ratios),
then removes the transformed model. Results are cached per recipe digest and settings in a JSON
file, so a resumed run (or a run at another budget with the same work directory) re-verifies nothing.
Torch-free.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path


class Verifier:
    def __init__(self, export_dir, work_dir, ppl="wikitext2", limit=8, seqlen=512, bos="auto", prompt=128,
                 decode=32, repeats=3, threads=None, log=print):
        self.export_dir = Path(export_dir)
        self.work = Path(work_dir)
        self.eval = {"ppl": ppl, "limit": limit, "seqlen": seqlen, "bos": bos}
        self.bench = {"prompt": prompt, "decode": decode, "repeats": repeats, "threads": threads}
        self.log = log
        self.cache_path = self.work / "verified.json"
        try:
            self.cache = json.loads(self.cache_path.read_text())
        except (OSError, ValueError):
            self.cache = {}

    def _key(self, digest: str) -> str:
        return json.dumps([digest, self.eval, self.bench, str(self.export_dir.resolve())], sort_keys=True)

    def _save(self) -> None:
        tmp = self.cache_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cache, indent=1))
        tmp.replace(self.cache_path)

    def _perplexity(self, model) -> dict:
        from nm_onnx.evaluate import evaluate

        r = evaluate(model, ppl=self.eval["ppl"], seqlen=self.eval["seqlen"], limit=self.eval["limit"],
                     bos=self.eval["bos"])["perplexity"]
        return {k: r[k] for k in ("perplexity", "nll", "tokens", "windows", "seqlen")}

    def dense(self) -> dict:
        key = self._key("dense")
        if key not in self.cache:
            self.log(f"verify: dense perplexity on {self.eval['limit']} x {self.eval['seqlen']} evaluation tokens")
            self.cache[key] = {"label": "dense", **self._perplexity(self.export_dir), "decode_speedup": 1.0,
                               "prefill_speedup": 1.0}
            self._save()
        return self.cache[key]

    def cached_points(self) -> list[dict]:
        """Every point verified with this verifier's settings (dense excluded)."""
        tail = json.dumps([self.eval, self.bench, str(self.export_dir.resolve())], sort_keys=True)[1:]
        return [v for k, v in self.cache.items() if k.endswith(tail) and v.get("label") != "dense"]

    def mark_accepted(self, digest: str | None, budget: str) -> None:
        """Flag the point `digest` as the recipe chosen for `budget` and no other point of that budget (a
        rerun of a budget may choose another round; None: none was chosen)."""
        for v in self.cached_points():
            if v.get("budget") == budget:
                v["accepted"] = v.get("digest") == digest
        self._save()

    def point(self, recipe, label: str, extra: dict | None = None) -> dict:
        """{label, perplexity, nll, decode_speedup, prefill_speedup, ...} of the recipe, verified."""
        key = self._key(recipe.digest())
        if key in self.cache:
            self.log(f"verify: {label}: cached")
            return {**self.cache[key], "label": label}
        from nm_onnx.bench import bench
        from nm_onnx.transform import transform

        dense = self.dense()
        out = self.work / "verify-model"
        if out.exists():
            shutil.rmtree(out)  # our own scratch model in the work directory
        self.log(f"verify: {label}: transform, perplexity, decode bench")
        try:
            rep = transform(self.export_dir, out, recipe, overwrite=True)
            ppl = self._perplexity(out)
            b = bench(out, baseline=self.export_dir, top=0, warmup=1, **self.bench)
        finally:
            if out.exists():
                shutil.rmtree(out)
        res = {"label": label, "digest": recipe.digest(), **ppl,
               "delta_nll": ppl["nll"] - dense["nll"],
               "relative_perplexity": math.exp(ppl["nll"] - dense["nll"]) - 1,
               "decode_speedup": b.get("decode_speedup"), "prefill_speedup": b.get("prefill_speedup"),
               "decode_tok_s": b["results"]["model"].get("decode_tok_s"),
               "dense_decode_tok_s": b["results"]["baseline"].get("decode_tok_s"),
               "sparse_sites": len(rep.passes.records), "transform_s": rep.seconds, **(extra or {})}
        self.cache[key] = res
        self._save()
        return res
