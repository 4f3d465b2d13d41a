"""Simulate a recipe on a Hugging Face model by wrapping its targeted nn.Linear modules.

`sparsify_model(model, recipe, artifact)` replaces every targeted `nn.Linear` with a `SparseLinear`
(its own pattern and mitigations: the site's `SiteSetting` from `recipe.resolve`; sites an override
makes dense stay plain linears) that shares the original weight and bias Parameters (state-dict keys are unchanged) and computes
`functional.sparse_linear`. The model's own code is untouched; `unsparsify_model` puts the plain
linears back. Constants come from the calibration artifact; amber/wanda factors are computed from the
weights when no artifact is given. With `share_selection` the members of a selection group
(`SparsityRecipe.selection_groups`: q/k/v, gate/up) get the factors of their concatenated weight and
one shared learned-shift Parameter, so they choose one mask per token.
"""

from __future__ import annotations

import torch
from torch import nn

from nm_onnx.errors import NmOnnxError
from nm_onnx.method import CONSTANT_NAMES, constant_shape, needed_constants
from nm_onnx.recipe import SiteSetting, SparsityRecipe
from nm_onnx.reference import functional as F

__all__ = ["CONSTANT_NAMES", "SparseLinear", "decoder_layers", "linear_paths", "sparse_modules",
           "sparsify_model", "unsparsify_model"]


class SparseLinear(nn.Module):
    """An nn.Linear under N:M activation sparsity (one site setting, one module path)."""

    def __init__(self, linear: nn.Linear, setting: SiteSetting, path: str):
        super().__init__()
        self.path = path
        self.setting = setting
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.original = [linear]  # a list, so it is not registered as a submodule
        k, o = self.in_features, self.out_features
        self.n, self.m = setting.group(k)
        if k % self.m != 0:
            raise NmOnnxError(
                f"pattern {setting.pattern} does not fit {path}: its input size K={k} is not a multiple "
                f"of M={self.m}; exclude this module from the recipe's targets"
            )
        self.enabled = True  # False: behave as the dense linear
        self.forced_masks: list[torch.Tensor] = []  # masks to replay, one per call in order (validate)
        dev = self.weight.device
        self.channel_scale = None
        self.static_shift = None
        self.learned_shift = None
        self.scale_a = None
        self.scale_b = None
        if setting.shift == "learned":
            self.learned_shift = nn.Parameter(torch.zeros(k, dtype=torch.float32, device=dev))
        if setting.scale_shift:
            self.scale_a = nn.Parameter(torch.zeros(o, dtype=torch.float32, device=dev))
            self.scale_b = nn.Parameter(torch.zeros(o, dtype=torch.float32, device=dev))

    def learnable(self) -> list[nn.Parameter]:
        """This site's learnable Parameters (a learned shift may be shared with its selection group)."""
        return [p for p in (self.learned_shift, self.scale_a, self.scale_b) if p is not None]

    def set_constants(self, constants: dict) -> None:
        """Load constants (numpy or torch) named as in the calibration artifact."""
        for name, value in constants.items():
            if name not in CONSTANT_NAMES:
                raise NmOnnxError(f"{self.path}: unknown calibration constant '{name}'")
            t = torch.as_tensor(value, dtype=torch.float32, device=self.weight.device)
            want = constant_shape(name, self.in_features, self.out_features)
            if (t.numel() != 1) if name == "static_shift" else tuple(t.shape) != want:
                raise NmOnnxError(
                    f"{self.path}: calibration constant '{name}' has shape {tuple(t.shape)}, "
                    f"expected {list(want)}; the artifact does not belong to this model"
                )
            current = getattr(self, name)
            if isinstance(current, nn.Parameter):
                with torch.no_grad():
                    current.copy_(t)
            else:
                setattr(self, name, t)

    def constants(self) -> dict[str, torch.Tensor]:
        """The constants this module carries (what the calibration artifact stores)."""
        out = {}
        for name in CONSTANT_NAMES:
            v = getattr(self, name)
            if v is not None:
                v = v.detach().to("cpu", torch.float32).clone()
                out[name] = v.reshape(1) if name == "static_shift" else v
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return nn.functional.linear(x, self.weight, self.bias)
        r = self.setting
        return F.sparse_linear(
            x,
            self.weight,
            self.bias,
            n=self.n,
            m=self.m,
            criterion=r.criterion,
            shift=r.shift,
            variance_correction=r.variance_correction,
            channel_scale=self.channel_scale,
            static_shift=self.static_shift,
            learned_shift=self.learned_shift,
            scale_a=self.scale_a,
            scale_b=self.scale_b,
            mask=self.forced_masks.pop(0) if self.forced_masks else None,
        )

    def extra_repr(self) -> str:
        return f"{self.path}: {self.in_features}->{self.out_features}, {self.setting.describe()}"


def linear_paths(model: nn.Module) -> list[str]:
    """Paths of every nn.Linear (or already wrapped SparseLinear) in the model, in module order."""
    return [name for name, mod in model.named_modules() if isinstance(mod, (nn.Linear, SparseLinear))]


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


def sparse_modules(model: nn.Module) -> dict[str, SparseLinear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, SparseLinear)}


def sparsify_model(model: nn.Module, recipe: SparsityRecipe | str, artifact=None, strict: bool = True):
    """Wrap the recipe's targeted linears in place; returns the model.

    artifact: a `CalibrationArtifact` (or None). strict=True requires every constant the recipe needs
    from calibration (static shift, learned shift, scale/shift); strict=False starts them at their
    initial values (zero), which is what layer-wise calibration fits.
    """
    recipe = SparsityRecipe.load(recipe)
    if sparse_modules(model):
        raise NmOnnxError("model is already sparsified; call unsparsify_model first")
    paths = linear_paths(model)
    settings = recipe.resolve(paths, {p: model.get_submodule(p).in_features for p in paths})
    wrappers = {p: SparseLinear(model.get_submodule(p), s, p) for p, s in settings.items() if not s.dense}
    groups = recipe.selection_groups(settings)  # checked before any constant is loaded
    for p, w in wrappers.items():
        s = w.setting
        consts = artifact.constants(p) if artifact is not None else {}
        if artifact is not None:
            if s.shift != "static":
                consts.pop("static_shift", None)
            w.set_constants(consts)
        if strict:
            missing = [c for c in needed_constants(s) if c not in consts]
            if missing:
                raise NmOnnxError(
                    f"recipe '{recipe.name}' needs calibration constants ({', '.join(missing)}) for {p}; "
                    "run `nm-onnx calibrate` and pass its output with --calibration"
                )
    share_group_constants(wrappers, groups)
    for p, w in wrappers.items():
        _set_module(model, p, w)
    return model


def share_group_constants(wrappers: dict[str, SparseLinear], groups: dict[str, list[str]]) -> None:
    """Give every site without artifact factors its channel factors (amber, wanda: of its group's weights
    stacked along the outputs) and let a group's members share one learned-shift Parameter (the first
    member's, which holds the artifact's value when there is one)."""
    for members in groups.values():
        ws = [wrappers[p] for p in members]
        crit = ws[0].setting.criterion
        if crit in F.CHANNEL_FACTOR_CRITERIA and any(w.channel_scale is None for w in ws):
            weight = ws[0].weight if len(ws) == 1 else torch.cat([w.weight.detach() for w in ws], dim=0)
            factors = torch.from_numpy(F.channel_factors(weight, crit)).to(ws[0].weight.device)
            for w in ws:
                w.channel_scale = factors
        if ws[0].learned_shift is not None:
            for w in ws[1:]:
                w.learned_shift = ws[0].learned_shift


def unsparsify_model(model: nn.Module) -> nn.Module:
    """Put the original nn.Linear modules back (undo sparsify_model)."""
    for p, w in sparse_modules(model).items():
        _set_module(model, p, w.original[0])
    return model


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the decoder blocks: the ModuleList named '*layers' with
    config.num_hidden_layers entries (model.layers, model.language_model.layers, ...)."""
    want = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if want is None:
        want = getattr(getattr(getattr(model, "config", None), "text_config", None), "num_hidden_layers", None)
    best = None
    for name, mod in model.named_modules():
        is_blocks = isinstance(mod, nn.ModuleList) and name.split(".")[-1] in ("layers", "h", "blocks")
        if is_blocks and (want is None or len(mod) == want):
            best = (name, mod)
            break
    if best is None:
        raise NmOnnxError("cannot find the model's decoder layers (a ModuleList named 'layers')")
    return best
