"""Sparsity recipes: what to prune, how to rank, which error mitigations, where, and how to calibrate.

A `SparsityRecipe` is the single description of a sparsification that every stage shares: the
PyTorch reference simulates it, `calibrate` computes its constants, the graph passes bake it into
ONNX. It round-trips through JSON (unknown keys are an error, so a typo never silently falls back to
a default) and has a stable `digest()` so artifacts and models can say which recipe made them.
Named presets cover the paper's configurations (`nm-onnx recipes` lists them).

A recipe may give sites different settings with ordered `overrides` (module globs plus any of
pattern, criterion, shift, scale_shift, variance_correction; pattern may be `dense`). `resolve` turns a
recipe and a model's module paths into one `SiteSetting` per selected site: it is the only place
where targets, excludes and overrides meet, and every stage (reference, calibration, passes,
validate) asks it.

`share_selection` (off by default) makes the projections that read one activation (q/k/v of an
attention, gate/up of an MLP: `SHARED_INPUT`) one *selection group*: one mask per token for the group,
channel factors (amber, wanda) from the group's concatenated weight, one learned shift fitted for the
group. `selection_groups` says which sites form a group; the passes pack a group into one MatMul
(horizontal fusion), and a packed ORT GenAI site (qkv_proj, gate_up_proj) is such a group already.

Semantics of every field: ../shared/METHOD.md and docs/method.md.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from nm_onnx.errors import NmOnnxError

CRITERIA = ("magnitude", "amber", "wanda", "clact")
SHIFTS = ("none", "median", "mean", "static", "learned")
MAX_M = 64
DENSE = "dense"  # an override pattern: the site stays dense
METHOD_FIELDS = ("pattern", "criterion", "shift", "scale_shift", "variance_correction")  # what an override may set

# Projections that read the same activation, by the packed module that computes them together (the
# name Phi-3 and ORT GenAI's builder give it), members in the order of its output columns.
SHARED_INPUT = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

SHARED_SUFFIX = "+shared"  # a preset name + this suffix: the preset with share_selection (8:16-amber+shared)

DEFAULT_TARGETS = ["model.layers.*.self_attn.*_proj", "model.layers.*.mlp.*_proj"]

# Calibration defaults (METHOD.md: layer-wise fitting as in the paper).
DEFAULT_CALIBRATION = {
    "data": "wikitext2",  # "wikitext2" or a path to a text file; never the evaluation split
    "samples": 256,  # number of random windows
    "seqlen": 512,  # tokens per window
    "seed": 0,  # window sampling and parameter init
    "lr": 1e-4,  # AdamW learning rate
    "betas": [0.9, 0.95],
    "weight_decay": 0.0,
    "warmup": 0.03,  # fraction of steps with linear warm-up, then linear decay to 0
    "epochs": 1,
    "batch_size": 1,
    "grad_clip": 1.0,
}
_CAL_TYPES = {
    "data": (str,),
    "samples": (int,),
    "seqlen": (int,),
    "seed": (int,),
    "lr": (int, float),
    "betas": (list, tuple),
    "weight_decay": (int, float),
    "warmup": (int, float),
    "epochs": (int,),
    "batch_size": (int,),
    "grad_clip": (int, float),
}


def parse_pattern(pattern: str) -> tuple[int | None, int | None, float]:
    """'N:M' -> (n, m, 1 - n/m); 'unstructured:S' -> (None, None, S). Raises NmOnnxError."""
    if not isinstance(pattern, str):
        raise NmOnnxError(f"pattern must be a string like '8:16' or 'unstructured:0.5', got {pattern!r}")
    p = pattern.strip().lower()
    if p.startswith("unstructured"):
        _, _, rest = p.partition(":")
        try:
            s = float(rest)
        except ValueError:
            raise NmOnnxError(
                f"bad pattern '{pattern}': write 'unstructured:S' with a sparsity 0 < S < 1, e.g. 'unstructured:0.5'"
            ) from None
        if not (0.0 < s < 1.0) or math.isnan(s):
            raise NmOnnxError(f"bad pattern '{pattern}': unstructured sparsity must be in (0, 1)")
        return None, None, s
    parts = p.split(":")
    if len(parts) != 2 or not all(x.strip().isdigit() for x in parts):
        raise NmOnnxError(f"bad pattern '{pattern}': write 'N:M' (e.g. '8:16') or 'unstructured:0.5'")
    n, m = int(parts[0]), int(parts[1])
    if n < 1:
        raise NmOnnxError(f"bad pattern '{pattern}': N must be at least 1")
    if n >= m:
        raise NmOnnxError(f"bad pattern '{pattern}': N must be smaller than M (N:M keeps N of every M)")
    if m > MAX_M:
        raise NmOnnxError(f"bad pattern '{pattern}': M must be at most {MAX_M}")
    return n, m, 1.0 - n / m


def _is_dense(pattern) -> bool:
    return isinstance(pattern, str) and pattern.strip().lower() == DENSE


def _check_method(values: dict, where: str, allow_dense: bool = False) -> None:
    """The method fields present in `values` (a recipe's or an override's) are valid; NmOnnxError if not."""
    if "pattern" in values and not (allow_dense and _is_dense(values["pattern"])):
        try:
            parse_pattern(values["pattern"])
        except NmOnnxError as e:
            raise NmOnnxError(f"{where}: {e}" + ("; or 'dense'" if allow_dense else "")) from None
    if "criterion" in values and values["criterion"] not in CRITERIA:
        raise NmOnnxError(f"{where}: unknown criterion '{values['criterion']}'; choose one of {', '.join(CRITERIA)}")
    if "shift" in values and values["shift"] not in SHIFTS:
        raise NmOnnxError(f"{where}: unknown shift '{values['shift']}'; choose one of {', '.join(SHIFTS)}")
    for key in ("scale_shift", "variance_correction"):
        if key in values and not isinstance(values[key], bool):
            raise NmOnnxError(f"{where}: '{key}' must be true or false")


class _Method:
    """Derived facts of one method setting (pattern, criterion, shift, scale_shift, variance_correction)."""

    pattern: str
    criterion: str
    shift: str
    scale_shift: bool
    variance_correction: bool

    @property
    def dense(self) -> bool:
        """The pattern is 'dense' (only an override can say so): the site is left as it is."""
        return _is_dense(self.pattern)

    def _parsed(self) -> tuple[int | None, int | None, float]:
        return (None, None, 0.0) if self.dense else parse_pattern(self.pattern)

    @property
    def n(self) -> int | None:
        return self._parsed()[0]

    @property
    def m(self) -> int | None:
        return self._parsed()[1]

    @property
    def sparsity(self) -> float:
        return self._parsed()[2]

    @property
    def is_unstructured(self) -> bool:
        return not self.dense and self._parsed()[0] is None

    @property
    def needs_fitting(self) -> bool:
        """Learnable parameters fitted layer by layer (METHOD items 3 and 4)."""
        return not self.dense and (self.shift == "learned" or self.scale_shift)

    @property
    def needs_calibration(self) -> bool:
        """True when this needs a calibration artifact (constants computed by `calibrate`)."""
        return not self.dense and (
            self.shift in ("static", "learned") or self.scale_shift or self.criterion in ("amber", "wanda"))

    def keep_count(self, k: int) -> int:
        """Entries kept per token row of length k: N per group of M, or k - round(S*k) unstructured."""
        n, m, s = self._parsed()
        if n is None:
            return k - round(s * k)
        return (k // m) * n

    def group(self, k: int) -> tuple[int, int]:
        """(n, m) of the selection groups for a row of length k (unstructured: one group of k)."""
        n, m, _ = self._parsed()
        if n is None:
            return self.keep_count(k), k
        return n, m

    def describe_method(self) -> str:
        if self.dense:
            return DENSE
        parts = [self.pattern, f"criterion={self.criterion}"]
        if self.shift != "none":
            parts.append(f"shift={self.shift}")
        if self.scale_shift:
            parts.append("scale_shift")
        if self.variance_correction:
            parts.append("variance_correction")
        return " ".join(parts)


@dataclass(frozen=True)
class SiteSetting(_Method):
    """What one selected site gets: the recipe's method fields after its overrides (`resolve`)."""

    module: str
    pattern: str
    criterion: str
    shift: str
    scale_shift: bool
    variance_correction: bool

    def describe(self) -> str:
        return self.describe_method()


@dataclass
class SparsityRecipe(_Method):
    name: str = "custom"
    pattern: str = "8:16"
    criterion: str = "magnitude"
    shift: str = "none"
    scale_shift: bool = False
    variance_correction: bool = False
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    exclude: list[str] = field(default_factory=list)
    overrides: list[dict] = field(default_factory=list)  # [{"modules": [globs], <method field>: value, ...}]
    calibration: dict = field(default_factory=lambda: copy.deepcopy(DEFAULT_CALIBRATION))
    share_selection: bool = False  # q/k/v and gate/up: one mask and one set of input constants per group

    def __post_init__(self):
        # Partial calibration dicts are completed with the defaults (unknown keys fail in validate()).
        if isinstance(self.calibration, dict):
            merged = copy.deepcopy(DEFAULT_CALIBRATION)
            merged.update(self.calibration)
            self.calibration = merged

    # ----- derived properties (the base setting; `resolve` gives each site's) ------------------------
    def _values(self, key: str) -> list:
        """Every value `key` takes in the recipe: the base one, then the overrides' (in order)."""
        return [getattr(self, key)] + [o[key] for o in self.overrides if isinstance(o, dict) and key in o]

    @property
    def needs_fitting(self) -> bool:
        """Some site may have learnable parameters (base or an override; per site: `resolve`)."""
        return "learned" in self._values("shift") or any(self._values("scale_shift"))

    @property
    def needs_calibration(self) -> bool:
        """Some site may need a calibration artifact (base or an override; per site: `resolve`)."""
        return (self.needs_fitting or "static" in self._values("shift")
                or any(c in ("amber", "wanda") for c in self._values("criterion")))

    # ----- validation ---------------------------------------------------------------------------
    def validate(self) -> SparsityRecipe:
        if not isinstance(self.name, str) or not self.name:
            raise NmOnnxError("recipe 'name' must be a non-empty string")
        parse_pattern(self.pattern)  # the base pattern is never 'dense' (a dense model needs no recipe)
        _check_method({f: getattr(self, f) for f in METHOD_FIELDS[1:]}, f"recipe '{self.name}'")
        for key in ("targets", "exclude"):
            v = getattr(self, key)
            if not isinstance(v, list) or not all(isinstance(g, str) and g for g in v):
                raise NmOnnxError(f"recipe '{self.name}': '{key}' must be a list of non-empty glob strings")
        if not self.targets:
            raise NmOnnxError(f"recipe '{self.name}': 'targets' is empty; give at least one module glob")
        self._validate_overrides()
        if not isinstance(self.share_selection, bool):
            raise NmOnnxError(f"recipe '{self.name}': 'share_selection' must be true or false")
        if not isinstance(self.calibration, dict):
            raise NmOnnxError(f"recipe '{self.name}': 'calibration' must be an object")
        unknown = sorted(set(self.calibration) - set(DEFAULT_CALIBRATION))
        if unknown:
            raise NmOnnxError(
                f"recipe '{self.name}': unknown calibration key(s) {unknown}; "
                f"known: {', '.join(DEFAULT_CALIBRATION)}"
            )
        for key, types in _CAL_TYPES.items():
            v = self.calibration[key]
            if isinstance(v, bool) or not isinstance(v, types):
                raise NmOnnxError(f"recipe '{self.name}': calibration '{key}' has a bad value {v!r}")
        c = self.calibration
        for key in ("samples", "seqlen", "epochs", "batch_size"):
            if c[key] < 1:
                raise NmOnnxError(f"recipe '{self.name}': calibration '{key}' must be at least 1")
        if c["seqlen"] < 2:
            raise NmOnnxError(f"recipe '{self.name}': calibration 'seqlen' must be at least 2")
        if not (c["lr"] > 0) or not (0 <= c["warmup"] < 1) or c["grad_clip"] <= 0 or c["weight_decay"] < 0:
            raise NmOnnxError(
                f"recipe '{self.name}': calibration needs lr > 0, 0 <= warmup < 1, grad_clip > 0, weight_decay >= 0"
            )
        b = c["betas"]
        if len(b) != 2 or not all(isinstance(x, (int, float)) and 0 <= x < 1 for x in b):
            raise NmOnnxError(f"recipe '{self.name}': calibration 'betas' must be two numbers in [0, 1)")
        return self

    def _validate_overrides(self) -> None:
        if not isinstance(self.overrides, list):
            raise NmOnnxError(f"recipe '{self.name}': 'overrides' must be a list of objects")
        known = ("modules", *METHOD_FIELDS)
        for i, o in enumerate(self.overrides):
            where = f"recipe '{self.name}': overrides[{i}]"
            if not isinstance(o, dict):
                raise NmOnnxError(f"{where} must be an object like {{\"modules\": [\"*.down_proj\"], \"pattern\": \"12:16\"}}")
            unknown = sorted(set(o) - set(known))
            if unknown:
                raise NmOnnxError(f"{where}: unknown key(s) {unknown}; known: {', '.join(known)}")
            mods = o.get("modules")
            if not isinstance(mods, list) or not mods or not all(isinstance(g, str) and g for g in mods):
                raise NmOnnxError(f"{where}: 'modules' must be a non-empty list of module globs")
            if not any(f in o for f in METHOD_FIELDS):
                raise NmOnnxError(f"{where} sets nothing; give at least one of {', '.join(METHOD_FIELDS)}")
            _check_method(o, where, allow_dense=True)

    # ----- targets ------------------------------------------------------------------------------
    def match(self, module_paths) -> list[str]:
        """Module paths selected by `targets` minus `exclude`, in the given order.

        A target or exclude glob that matches nothing is an error (a typo must not silently prune
        nothing, or everything), and so is a selection that the excludes leave empty.
        """
        paths = list(module_paths)
        sample = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
        selected = set()
        for key, globs in (("target", self.targets), ("exclude", self.exclude)):
            for glob in globs:
                hits = [p for p in paths if fnmatch.fnmatchcase(p, glob)]
                if not hits:
                    raise NmOnnxError(
                        f"recipe '{self.name}': {key} '{glob}' matches no module; available: {sample or '(none)'}"
                    )
                if key == "target":
                    selected.update(hits)
        chosen = [p for p in paths if p in selected and not any(fnmatch.fnmatchcase(p, g) for g in self.exclude)]
        if not chosen:
            raise NmOnnxError(
                f"recipe '{self.name}': the excludes {self.exclude} remove every target, so nothing would be "
                "sparsified; narrow 'exclude' (a dense model needs no transform)"
            )
        return chosen

    def resolve(self, module_paths, k: dict[str, int] | None = None) -> dict[str, SiteSetting]:
        """{module path: SiteSetting} of every selected module (`match`), in the given order.

        The one resolution of a recipe: each site starts from the recipe's own method fields, then
        every override whose `modules` globs match it sets its fields, in order (later ones win per
        field). Sites whose pattern becomes 'dense' are included (`setting.dense`): callers leave them
        dense. Errors (one line): an override glob that matches no selected module; with `k`
        ({module path: K}) a pattern whose M does not divide K at a site; every site dense.
        """
        chosen = self.match(module_paths)
        sample = ", ".join(chosen[:8]) + (", ..." if len(chosen) > 8 else "")
        for i, o in enumerate(self.overrides):
            for glob in o["modules"]:
                if not any(fnmatch.fnmatchcase(p, glob) for p in chosen):
                    raise NmOnnxError(
                        f"recipe '{self.name}': overrides[{i}] module '{glob}' matches no selected module "
                        f"(targets minus exclude); selected: {sample}"
                    )
        base = {f: getattr(self, f) for f in METHOD_FIELDS}
        out: dict[str, SiteSetting] = {}
        for path in chosen:
            values = dict(base)
            for o in self.overrides:
                if any(fnmatch.fnmatchcase(path, g) for g in o["modules"]):
                    values.update({f: o[f] for f in METHOD_FIELDS if f in o})
            s = SiteSetting(module=path, **values)
            size = None if k is None else k.get(path)
            if size is not None and s.m is not None and size % s.m != 0:
                raise NmOnnxError(
                    f"recipe '{self.name}': pattern {s.pattern} does not divide K={size} at site '{path}' "
                    f"(K % {s.m} != 0); choose another pattern or exclude this module"
                )
            out[path] = s
        if all(s.dense for s in out.values()):
            raise NmOnnxError(
                f"recipe '{self.name}': the overrides make every selected module dense, so nothing would be "
                "sparsified; give some site a pattern"
            )
        return out

    def selection_groups(self, settings: dict[str, SiteSetting]) -> dict[str, list[str]]:
        """{group name: member module paths} of the resolved sparse sites (`resolve`'s result).

        Without `share_selection` every sparse site is its own group (named by its path). With it, the
        sparse members of one `SHARED_INPUT` set under one parent (`model.layers.0.self_attn.q_proj`,
        `k_proj`, `v_proj`) form the group `model.layers.0.self_attn.qkv_proj`, members in column
        order; a set with one sparse member is a group of one. Error (one line): members of a group
        with different settings (one mask cannot serve two patterns or criteria).
        """
        sparse = [p for p, s in settings.items() if not s.dense]
        if not self.share_selection:
            return {p: [p] for p in sparse}
        groups: dict[str, list[str]] = {}
        for path in sparse:
            parent, _, leaf = path.rpartition(".")
            packed = next((name for name, members in SHARED_INPUT.items() if leaf in members), None)
            if packed is None:
                groups[path] = [path]
                continue
            groups.setdefault(f"{parent}.{packed}" if parent else packed, []).append(path)
        for name, members in list(groups.items()):
            leaves = SHARED_INPUT.get(name.rpartition(".")[2])
            if leaves and len(members) > 1:
                members.sort(key=lambda p: leaves.index(p.rpartition(".")[2]))
                first = settings[members[0]]
                for other in members[1:]:
                    if settings[other].describe() != first.describe():
                        raise NmOnnxError(
                            f"recipe '{self.name}': share_selection gives '{members[0]}' and '{other}' one mask "
                            f"(they read the same activation), but their settings differ ({first.describe()} vs "
                            f"{settings[other].describe()}); give the group one setting or turn share_selection off"
                        )
            if len(members) == 1 and members[0] != name:
                groups[members[0]] = groups.pop(name)
        return groups

    def mac_sparsity(self, shapes: dict[str, tuple[int, int]]) -> float:
        """Fraction of the selected sites' multiply-adds skipped, {module path: (K, O)} -> 0..1 (a
        uniform recipe: its pattern's sparsity; a mixed one: the sites' sparsities weighted by K x O)."""
        settings = self.resolve(list(shapes), {m: k for m, (k, _) in shapes.items()})
        total = sum(shapes[m][0] * shapes[m][1] for m in settings)
        return sum(shapes[m][0] * shapes[m][1] * s.sparsity for m, s in settings.items()) / total if total else 0.0

    # ----- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["calibration"] = dict(d["calibration"])
        d["calibration"]["betas"] = list(d["calibration"]["betas"])
        if not d["overrides"]:  # a recipe without overrides keeps the JSON and digest it always had
            del d["overrides"]
        if not d["share_selection"]:  # likewise without shared selection
            del d["share_selection"]
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    def digest(self) -> str:
        """sha256 of the canonical JSON (sorted keys, no whitespace): identifies the recipe."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        from nm_onnx.io import atomic_file

        with atomic_file(path) as f:
            f.write(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, d: dict, origin: str = "recipe") -> SparsityRecipe:
        if not isinstance(d, dict):
            raise NmOnnxError(f"{origin}: a recipe must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise NmOnnxError(f"{origin}: unknown recipe key(s) {unknown}; known: {', '.join(sorted(known))}")
        d = copy.deepcopy(d)
        cal = d.get("calibration")
        if isinstance(cal, dict) and isinstance(cal.get("betas"), tuple):
            cal["betas"] = list(cal["betas"])
        try:
            return cls(**d).validate()
        except NmOnnxError as e:
            if origin == "recipe":
                raise
            raise NmOnnxError(f"{origin}: {e}") from None
        except TypeError as e:  # e.g. a non-dict calibration
            raise NmOnnxError(f"{origin}: {e}") from None

    @classmethod
    def from_json(cls, text: str, origin: str = "recipe") -> SparsityRecipe:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise NmOnnxError(f"{origin}: malformed JSON ({e})") from None
        return cls.from_dict(d, origin)

    @classmethod
    def load(cls, source: str | os.PathLike | SparsityRecipe) -> SparsityRecipe:
        """A preset name, a recipe JSON file, or a calibration artifact directory (its recipe.json)."""
        if isinstance(source, SparsityRecipe):
            return copy.deepcopy(source).validate()
        s = str(source)
        if s in PRESETS:
            return copy.deepcopy(PRESETS[s])
        if s.endswith(SHARED_SUFFIX) and s[:-len(SHARED_SUFFIX)] in PRESETS:  # e.g. 8:16-amber+shared
            shared = copy.deepcopy(PRESETS[s[:-len(SHARED_SUFFIX)]])
            shared.name, shared.share_selection = s, True
            return shared.validate()
        p = Path(s)
        if p.is_dir() and (p / "recipe.json").is_file():
            p = p / "recipe.json"
        if p.is_file():
            try:
                text = p.read_text(encoding="utf-8")
            except OSError as e:
                raise NmOnnxError(f"cannot read recipe file '{p}': {e}") from None
            return cls.from_json(text, origin=f"recipe file '{p}'")
        close = difflib.get_close_matches(s, list(PRESETS), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise NmOnnxError(
            f"unknown recipe '{s}'{hint}: give a preset name (list them with `nm-onnx recipes`) "
            "or a path to a recipe JSON file"
        )

    def describe(self) -> str:
        """One line: the base setting, then each override as `globs -> fields`."""
        parts = [self.describe_method()]
        for o in self.overrides:
            fields = [f"{f}={o[f]}" if not isinstance(o[f], bool) else (f if o[f] else f"no {f}")
                      for f in METHOD_FIELDS if f in o]
            parts.append(f"[{','.join(o['modules'])} -> {' '.join(fields)}]")
        if self.share_selection:
            parts.append("share_selection")
        return " ".join(parts)


def _presets() -> dict[str, SparsityRecipe]:
    out: dict[str, SparsityRecipe] = {}

    def add(name: str, **kw) -> None:
        out[name] = SparsityRecipe(name=name, **kw).validate()

    for p in ("2:4", "4:8", "8:16", "16:32"):
        add(f"{p}-magnitude", pattern=p)
        add(f"{p}-median-shift", pattern=p, shift="median")
        add(f"{p}-mean-shift", pattern=p, shift="mean")
        add(f"{p}-static-shift", pattern=p, shift="static")
        add(f"{p}-variance", pattern=p, variance_correction=True)
        add(f"{p}-median-variance", pattern=p, shift="median", variance_correction=True)
        add(f"{p}-learned-shift", pattern=p, shift="learned")
        add(f"{p}-scale-shift", pattern=p, scale_shift=True)
        add(f"{p}-amber", pattern=p, criterion="amber")
        add(f"{p}-wanda", pattern=p, criterion="wanda")
        add(f"{p}-clact", pattern=p, criterion="clact")
    add("unstructured-50", pattern="unstructured:0.5")
    add("unstructured-70", pattern="unstructured:0.7")
    add("unstructured-50-variance", pattern="unstructured:0.5", variance_correction=True)
    return out


PRESETS: dict[str, SparsityRecipe] = _presets()


def preset_names() -> list[str]:
    return list(PRESETS)
