"""Loss sensitivity of each site group to each candidate pattern, on calibration text (PyTorch reference).

The proxy (cheap: one decoder block per group and pattern). On the calibration windows, one dense
forward records every block's input h_l and one backward the gradient g_l of the windows' summed
next-token NLL with respect to every block's output. Sparsifying only group G of block l (the
reference's `SparseLinear`, the base recipe's criterion and mitigations, the candidate's N:M) changes
that block's output by delta on the same dense input; the predicted increase of the mean NLL is the
Fisher (second-order) estimate

    proxy = 1 / (2 N) * sum over tokens s of (g_s . delta_s)^2        (N = predicted tokens)

TEAL-style block-output errors, weighted by how much the loss cares about each direction.

The check (what the report shows). For `check` (group, pattern) pairs drawn at random (seeded, spread
over the group kinds and patterns), the
true loss increase with only that group sparsified is measured exactly on the same windows (the
blocks from l on run again from the cached h_l, then the final norm and lm_head). Their Spearman
rank correlation with the proxy says how well the proxy orders groups; the median ratio
true / proxy (pairs with a positive true increase) is the scale that turns proxies into predicted
costs (`cost = scale * proxy`; measured pairs use their true value).

Resumable: `table.save()` after every block; a rerun with the same key skips the finished blocks.
"""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nm_onnx.autotune.spec import layer_index
from nm_onnx.calibration.layerwise import capture_layer_inputs
from nm_onnx.errors import NmOnnxError
from nm_onnx.progress import progress as progress_bar
from nm_onnx.recipe import SparsityRecipe
from nm_onnx.reference.modules import decoder_layers, sparsify_model, unsparsify_model


def spearman(a, b) -> float | None:
    """Spearman rank correlation (average ranks for ties); None with fewer than 3 pairs or no spread."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3:
        return None

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):  # average ranks of ties
            idx = x == v
            r[idx] = r[idx].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


class SensitivityTable:
    """{group: {pattern: proxy}}, the dense NLL and the checked pairs, cached in a JSON file."""

    def __init__(self, path: str | Path | None, key: str):
        self.path = Path(path) if path is not None else None
        self.key = key
        self.data = {"key": key, "dense_nll": None, "tokens": None, "layers_done": [], "proxy": {}, "true": {}}
        if self.path is not None and self.path.is_file():
            try:
                d = json.loads(self.path.read_text())
            except ValueError:
                d = {}
            if d.get("key") == key:
                self.data = d

    def save(self) -> None:
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            tmp.replace(self.path)

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete"))

    def check_summary(self) -> dict:
        pairs = [(self.data["proxy"][g][p], t) for g, by in self.data["true"].items() for p, t in by.items()]
        ratios = [t / x for x, t in pairs if t > 0 and x > 0]
        return {"pairs": len(pairs),
                "spearman": spearman([x for x, _ in pairs], [t for _, t in pairs]),
                "scale": statistics.median(ratios) if ratios else 1.0,
                "proxy": [x for x, _ in pairs], "true": [t for _, t in pairs]}

    def costs(self) -> dict[str, dict[str, float]]:
        """{group: {pattern: predicted loss increase}}: scale * proxy, or the measured value where checked."""
        scale = self.check_summary()["scale"]
        out = {}
        for g, by in self.data["proxy"].items():
            out[g] = {p: self.data["true"].get(g, {}).get(p, scale * x) for p, x in by.items()}
        return out


def _final(model: nn.Module, layers_path: str):
    """(final norm, lm_head) of a decoder: the norm beside the layers, the output embeddings."""
    base = model.get_submodule(layers_path.rsplit(".", 1)[0]) if "." in layers_path else model
    norm = getattr(base, "norm", None)
    head = model.get_output_embeddings()
    if norm is None or head is None:
        raise NmOnnxError("autotune: cannot find the model's final norm and lm_head (a Llama-like decoder "
                          "is needed for the block-wise sensitivity)")
    return norm, head


def _block(layer, x, kw):
    out = layer(x, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


def _nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits[0, :-1].double(), ids[1:], reduction="sum")


def _check_pairs(groups, patterns, check: int, seed: int) -> list[tuple[str, str]]:
    """`check` (group, pattern) pairs, seeded, spread over the group kinds (attn_in, ..., mlp_out) and
    the patterns: strata in random order, one random pair from each in turn."""
    rng = random.Random(seed)
    strata: dict[tuple[str, str], list] = {}
    for g in groups:
        for p in patterns:
            strata.setdefault((g.rsplit(".", 1)[-1], p), []).append((g, p))
    pools = list(strata.values())
    for pool in pools:
        rng.shuffle(pool)
    rng.shuffle(pools)
    out = []
    while len(out) < check and any(pools):
        for pool in pools:
            if pool and len(out) < check:
                out.append(pool.pop())
    return out


def _probe(base: SparsityRecipe, modules: list[str], pattern: str) -> SparsityRecipe:
    return SparsityRecipe(name="autotune-probe", pattern=pattern, criterion=base.criterion, shift=base.shift,
                          variance_correction=base.variance_correction, targets=list(modules),
                          share_selection=base.share_selection)


def measure_sensitivity(model: nn.Module, groups: dict[str, list[str]], candidates: list[str],
                        base: SparsityRecipe, windows: np.ndarray, table: SensitivityTable, check: int = 8,
                        seed: int = 0, progress: bool = True, log=print) -> SensitivityTable:
    """Fill `table` with the proxy of every (group, candidate) and `check` exact measurements."""
    if table.complete:
        log("sensitivity: reusing the cached table")
        return table
    for p in model.parameters():
        p.requires_grad_(False)
    layers_path, layers = decoder_layers(model)
    norm, head = _final(model, layers_path)
    by_layer: dict[int, list[str]] = {}
    for g, mods in groups.items():
        idx = {layer_index(m) for m in mods}
        if len(idx) != 1 or None in idx:
            raise NmOnnxError(f"autotune tunes sites inside decoder layers; group '{g}' ({', '.join(mods)}) is not "
                              "one layer's: exclude it in --base-recipe")
        by_layer.setdefault(idx.pop(), []).append(g)
    patterns = [c for c in candidates if c != "dense"]
    windows = np.asarray(windows, dtype=np.int64)
    log(f"sensitivity: dense forward + backward on {len(windows)} x {windows.shape[1]} calibration tokens")
    h0, kws = capture_layer_inputs(model, layers, windows)
    inputs = [[None] * len(windows) for _ in layers]  # inputs[l][w]: dense input of block l, [1, T, H]
    grads = [[None] * len(windows) for _ in layers]  # gradient of the window's NLL sum at block l's output
    dense_nll, tokens = 0.0, 0
    for w in range(len(windows)):
        ids = torch.as_tensor(windows[w])
        x = h0[w].unsqueeze(0).clone().requires_grad_(True)
        outs = []
        with torch.enable_grad():
            h = x
            for li, layer in enumerate(layers):
                inputs[li][w] = h.detach()
                h = _block(layer, h, kws[li])
                h.retain_grad()
                outs.append(h)
            loss = _nll_sum(head(norm(h)), ids)
            loss.backward()
            loss = loss.detach()
        for li, o in enumerate(outs):
            grads[li][w] = o.grad.detach()
        dense_nll += loss.item()
        tokens += len(ids) - 1
        del outs, loss, h, x
    table.data["dense_nll"] = dense_nll / tokens
    table.data["tokens"] = tokens

    def dense_out(li, w):
        return inputs[li + 1][w] if li + 1 < len(layers) else None

    with torch.inference_mode():
        last = [_block(layers[-1], inputs[-1][w], kws[-1]) for w in range(len(windows))]
        todo = [li for li in sorted(by_layer) if li not in table.data["layers_done"]]
        bar = progress_bar(todo, "sensitivity", progress, unit="layer")
        for li in bar:
            for g in by_layer[li]:
                for p in patterns:
                    sparsify_model(model, _probe(base, groups[g], p))
                    try:
                        s = 0.0
                        for w in range(len(windows)):
                            y = _block(layers[li], inputs[li][w], kws[li])
                            ref = dense_out(li, w) if li + 1 < len(layers) else last[w]
                            s += float(((grads[li][w] * (y - ref)).sum(-1).double() ** 2).sum())
                    finally:
                        unsparsify_model(model)
                    table.data["proxy"].setdefault(g, {})[p] = 0.5 * s / tokens
            table.data["layers_done"].append(li)
            table.save()
        sample = _check_pairs(groups, patterns, check, seed)
        sample = [(g, p) for g, p in sample if p not in table.data["true"].get(g, {})]
        for g, p in progress_bar(sample, "sensitivity check (exact)", progress, unit="pair"):
            li = layer_index(groups[g][0])
            sparsify_model(model, _probe(base, groups[g], p))
            try:
                total = 0.0
                for w in range(len(windows)):
                    h = inputs[li][w]
                    for lj in range(li, len(layers)):
                        h = _block(layers[lj], h, kws[lj])
                    total += float(_nll_sum(head(norm(h)), torch.as_tensor(windows[w])))
            finally:
                unsparsify_model(model)
            table.data["true"].setdefault(g, {})[p] = total / tokens - table.data["dense_nll"]
            table.save()
    table.data["complete"] = True
    table.save()
    return table
