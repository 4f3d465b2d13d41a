"""`calibrate`: compute the constants a recipe needs, layer by layer, resumably.

What is computed (METHOD.md), per site by its own setting (`recipe.resolve`: a mixed recipe gives
sites different patterns and mitigations; the fitting masks each site with its own N:M):
  * amber / wanda channel factors: from each targeted weight (reference.channel_factors), or from the
    concatenated weights of a selection group with `share_selection` (then one learned shift is
    fitted per group; every member's constants are stored under its own module path);
  * static shift: mean over calibration tokens of the per-token median of each target's input;
  * learned per-channel shift / output scale+shift: fitted per decoder layer, in order. The layer's
    inputs are the outputs of the already sparsified (and fitted) upstream layers; the target is the
    *dense* layer's output on those same inputs; MSE, AdamW (lr 1e-4, betas (0.9, 0.95), wd 0), linear
    schedule with 3% warm-up, batch 1, one epoch, grad clip 1.0 (all from recipe.calibration). The
    sparsified layer's outputs feed the next layer. Static-shift statistics are taken the same way
    (dense layer on the sparsified upstream inputs).

Resumable: after each finished layer its constants and report go to a hidden state directory next to
the output (`.<out>.calibrate-state`); a restarted run with the same recipe, model and data reloads
them, recomputes the finished layers' outputs (forward only) and continues. The output directory is
written atomically at the end and the state directory is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nm_onnx.calibration.artifact import CalibrationArtifact
from nm_onnx.errors import NmOnnxError
from nm_onnx.progress import progress as progress_bar
from nm_onnx.recipe import SparsityRecipe
from nm_onnx.reference import functional as F
from nm_onnx.reference.modules import SparseLinear, decoder_layers, sparsify_model, unsparsify_model


class _Stop(Exception):
    pass


def _detach(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, tuple):
        return tuple(_detach(x) for x in v)
    if isinstance(v, list):
        return [_detach(x) for x in v]
    return v


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, windows: np.ndarray):
    """(hidden states entering layer 0 for every window [S, L, H], per-layer forward kwargs).

    The kwargs (position embeddings, causal mask, ...) depend only on the window length, so they are
    recorded once from a full forward of the first window, separately for every layer (Gemma3 gives
    local and global layers different masks).
    """
    layer_kwargs: list[dict | None] = [None] * len(layers)
    hooks = []
    for i, layer in enumerate(layers):
        def rec(mod, args, kwargs, i=i):
            kw = {k: _detach(v) for k, v in kwargs.items() if k != "hidden_states"}
            kw["use_cache"] = False
            kw.pop("past_key_values", None)
            kw.pop("past_key_value", None)
            layer_kwargs[i] = kw
        hooks.append(layer.register_forward_pre_hook(rec, with_kwargs=True))
    try:
        model(input_ids=torch.as_tensor(windows[:1], dtype=torch.long), use_cache=False)
    finally:
        for h in hooks:
            h.remove()

    inputs = []

    def grab(mod, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        inputs.append(hs.detach()[0].clone())
        raise _Stop

    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for w in windows:
            try:
                model(input_ids=torch.as_tensor(w, dtype=torch.long).reshape(1, -1), use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return torch.stack(inputs), layer_kwargs


def _layer_out(layer: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    out = layer(x.unsqueeze(0), **kw)
    return (out[0] if isinstance(out, (tuple, list)) else out)[0]


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: torch.Tensor, kw: dict) -> torch.Tensor:
    """The layer's output for every window [S, L, H] (batch 1 at a time)."""
    return torch.stack([_layer_out(layer, inputs[i], kw) for i in range(len(inputs))])


@torch.no_grad()
def layer_mse(layer: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, kw: dict) -> float:
    """Mean MSE between the layer's outputs and the targets over the windows."""
    total = 0.0
    for i in range(len(inputs)):
        total += float(nn.functional.mse_loss(_layer_out(layer, inputs[i], kw), targets[i]))
    return total / max(len(inputs), 1)


@contextlib.contextmanager
def _median_stats(modules):
    """{module: [sum of per-token medians of its input, tokens]} collected by forward pre-hooks while
    the block runs (the static shift's statistic, METHOD.md item 2)."""
    stats: dict = {}

    def hook(mod, args):
        with torch.no_grad():
            med = F.token_median(args[0].detach().float())
            s = stats.setdefault(mod, [0.0, 0])
            s[0] += float(med.double().sum())
            s[1] += med.numel()

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def fit_layer(
    layer: nn.Module,
    params: list[nn.Parameter],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kw: dict,
    cal: dict,
    seed: int = 0,
    progress=None,
) -> list[float]:
    """Fit `params` so that the (sparsified) layer maps inputs to targets; returns per-step losses."""
    if not params:
        return []
    for p in layer.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(
        params, lr=cal["lr"], betas=tuple(cal["betas"]), weight_decay=cal["weight_decay"]
    )
    bs = cal["batch_size"]
    steps_per_epoch = math.ceil(len(inputs) / bs)
    total = steps_per_epoch * cal["epochs"]
    warmup = math.ceil(cal["warmup"] * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warmup))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    with torch.enable_grad():
        for _ in range(cal["epochs"]):
            order = torch.randperm(len(inputs), generator=gen)
            for s in range(steps_per_epoch):
                idx = order[s * bs:(s + 1) * bs]
                out = layer(inputs[idx], **kw)
                out = out[0] if isinstance(out, (tuple, list)) else out
                loss = nn.functional.mse_loss(out, targets[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cal["grad_clip"])
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress.set_postfix(loss=f"{losses[-1]:.4g}")
    for p in params:
        p.requires_grad_(False)
    return losses


def _state_key(recipe: SparsityRecipe, model_id: str, windows: np.ndarray, data_source: str) -> str:
    h = hashlib.sha256()
    h.update(recipe.digest().encode())
    h.update(model_id.encode())
    h.update(data_source.encode())
    h.update(np.ascontiguousarray(windows, dtype=np.int64).tobytes())
    return h.hexdigest()


def _model_id(model: nn.Module) -> str:
    h = hashlib.sha256(str(getattr(model, "config", "")).encode())
    for name, p in list(model.named_parameters())[:4]:
        h.update(name.encode())
        h.update(p.detach().float().reshape(-1)[:64].numpy().tobytes())
    return h.hexdigest()


def calibrate(
    model: nn.Module,
    recipe: SparsityRecipe,
    windows: np.ndarray,
    out: str | Path,
    data_source: str = "",
    model_source: str = "",
    progress: bool = True,
    max_layers: int | None = None,
    overwrite: bool = False,
    input_paths=(),
    bos: int | None = None,
) -> CalibrationArtifact:
    """Compute the recipe's constants on `windows` ([S, L] token ids) and write the artifact to `out`.

    `model` is modified during the run (wrapped, then restored); max_layers limits layer-wise work to
    the first decoder layers (for tests). `overwrite` and `input_paths` follow nm_onnx.io's output rules
    (checked before any work); `bos` is the BOS id the windows start with (recorded). Returns the saved
    artifact.
    """
    from nm_onnx.io import check_output_dir
    recipe = SparsityRecipe.load(recipe)
    out = Path(out)
    check_output_dir(out, "calibration", input_paths, overwrite)
    t_start = time.time()
    windows = np.asarray(windows, dtype=np.int64)
    state_dir = out.parent / f".{out.name}.calibrate-state"
    key = _state_key(recipe, _model_id(model), windows, data_source)
    meta_file = state_dir / "meta.json"

    for p in model.parameters():
        p.requires_grad_(False)
    sparsify_model(model, recipe, artifact=None, strict=False)  # validates targets and K % M first
    try:
        if state_dir.exists():
            try:
                same = json.loads(meta_file.read_text())["key"] == key
            except (OSError, ValueError, KeyError, TypeError):
                same = False
            if not same:
                shutil.rmtree(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        meta_file.write_text(json.dumps({"key": key, "recipe": recipe.name}))
        wrappers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
        tensors: dict[str, np.ndarray] = {}  # channel factors: set by sparsify_model (of the group's weight)
        layer_reports = []
        layerwise = [p for p, w in wrappers.items() if w.setting.shift == "static" or w.setting.needs_fitting]
        if layerwise:
            layers_path, layers = decoder_layers(model)
            by_layer = [
                {p: w for p, w in wrappers.items() if p.startswith(f"{layers_path}.{i}.")}
                for i in range(len(layers))
            ]
            outside = set(layerwise) - {p for d in by_layer for p in d}
            if outside:
                raise NmOnnxError(
                    f"recipe '{recipe.name}' needs layer-wise calibration but targets modules outside the "
                    f"decoder layers ({sorted(outside)[:3]}); exclude them"
                )
            n_layers = len(layers) if max_layers is None else min(max_layers, len(layers))
            for w in wrappers.values():
                w.enabled = False
            inputs, layer_kwargs = capture_layer_inputs(model, layers, windows)
            for w in wrappers.values():
                w.enabled = True
            bar = progress_bar(range(n_layers), f"calibrate {recipe.name}", progress, unit="layer")
            for i in bar:
                layer, kw, ws = layers[i], layer_kwargs[i], by_layer[i]
                done = state_dir / f"layer_{i:04d}.json"
                if done.is_file():  # resume: reload constants, recompute the outputs
                    from safetensors.numpy import load_file

                    consts = load_file(str(state_dir / f"layer_{i:04d}.safetensors"))
                    for p, w in ws.items():
                        w.set_constants({k[len(p) + 1:]: v for k, v in consts.items() if k.startswith(p + ".")})
                    layer_reports.append(json.loads(done.read_text()))
                    inputs = run_layer(layer, inputs, kw)
                    continue
                t0 = time.time()
                if not ws:
                    inputs = run_layer(layer, inputs, kw)
                    continue
                for w in ws.values():
                    w.enabled = False
                with _median_stats([w for w in ws.values() if w.setting.shift == "static"]) as stats:
                    targets = run_layer(layer, inputs, kw)
                for w in ws.values():
                    if w in stats:
                        w.static_shift = torch.tensor(stats[w][0] / stats[w][1], dtype=torch.float32)
                    w.enabled = True
                loss_before = layer_mse(layer, inputs, targets, kw)
                params = list({id(p): p for w in ws.values() for p in w.learnable()}.values())  # shared once
                losses = fit_layer(layer, params, inputs, targets, kw, recipe.calibration,
                                   seed=recipe.calibration["seed"] + i, progress=bar)
                outputs = run_layer(layer, inputs, kw)
                loss_after = float(np.mean([float(nn.functional.mse_loss(outputs[j], targets[j]))
                                            for j in range(len(outputs))]))
                rep = {
                    "layer": i,
                    "modules": list(ws),
                    "loss_before": loss_before,
                    "loss_after": loss_after,
                    "steps": len(losses),
                    "seconds": round(time.time() - t0, 3),
                }
                from safetensors.numpy import save_file

                layer_consts = {
                    f"{p}.{k}": v.numpy() for p, w in ws.items() for k, v in w.constants().items()
                    if k != "channel_scale"
                }
                save_file(layer_consts, str(state_dir / f"layer_{i:04d}.safetensors"))
                done.write_text(json.dumps(rep))
                layer_reports.append(rep)
                bar.set_postfix(before=f"{loss_before:.4g}", after=f"{loss_after:.4g}")
                inputs = outputs
                del targets
        for path, w in wrappers.items():
            for k, v in w.constants().items():
                if k == "static_shift" and w.setting.shift != "static":
                    continue
                if k in ("learned_shift", "scale_a", "scale_b", "static_shift") and not _calibrated(
                    path, layer_reports
                ):
                    continue
                tensors[f"{path}.{k}"] = v.numpy()
        report = {
            "recipe": recipe.name,
            "model": model_source,
            "data": data_source,
            "samples": int(windows.shape[0]),
            "seqlen": int(windows.shape[1]),
            "bos": bos,
            "seed": recipe.calibration["seed"],
            "layers": layer_reports,
            "seconds": round(time.time() - t_start, 3),
            "targets": list(wrappers),
            "sites": {p: [w.in_features, w.out_features] for p, w in wrappers.items()},
        }
        art = CalibrationArtifact(recipe=recipe, tensors=tensors, report=report)
        art.save(out, overwrite, input_paths)
    except BaseException:
        if state_dir.is_dir() and not any(state_dir.glob("layer_*.json")):
            shutil.rmtree(state_dir, ignore_errors=True)  # nothing worth resuming
        raise
    finally:
        unsparsify_model(model)
    shutil.rmtree(state_dir, ignore_errors=True)
    return art


def _calibrated(path: str, layer_reports: list[dict]) -> bool:
    return any(path in r["modules"] for r in layer_reports)
