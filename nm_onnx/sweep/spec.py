"""The sweep spec: models x recipes x evaluations, read from TOML (or YAML) and checked before any work.

    [[models]]                       # or models = ["smollm2-135m", "path/to/hf"]
    name = "llama"                   # optional (default: the source's last path part)
    source = "path/to/hf-dir"        # alias, HF directory, .gguf, optimum or GenAI export directory

    recipes = ["8:16-magnitude", "recipes/mine.json", "autotune:+5%", "weight:8:16"]
                                     # presets, recipe files, autotune budgets (`nm-onnx autotune`'s
                                     # recipe for that budget) and weight-pruning baselines (the PyTorch
                                     # reference's magnitude N:M weight pruning); dense always runs

    [calibration]                    # optional: the budget of recipes that need constants
    samples = 16
    seqlen = 256

    [autotune]                       # optional: the settings of every autotune:BUDGET recipe
    candidates = "dense,12:16,10:16,8:16,6:16"
    samples = 8                      # calibration windows for the sensitivity (and seqlen, check,
    max_rounds = 3                   # limit, eval_seqlen, prompt, decode, repeats, speed_repeats,
                                     # base_recipe: as `nm-onnx autotune`'s options)

    [evaluations.perplexity]         # any of perplexity, lm_eval, bench
    windows = 8                      # 0 = all
    seqlen = 512
    data = "wikitext2"               # or a text file
    [evaluations.lm_eval]
    tasks = ["arc_easy"]
    limit = 50
    batch_size = 16
    [evaluations.bench]
    prompt = 128
    decode = 32
    repeats = 3
    [evaluations.twin]               # the PyTorch reference simulation of the recipe on the first
    windows = 1                      # windows of the perplexity text, next to ORT on the same windows
    seqlen = 512
    data = "wikitext2"

A weight-pruning row exists in PyTorch only: its perplexity is the reference's (`perplexity.ppl_torch`),
and bench, lm_eval and twin do not apply to it. Autotune, twin and weight rows need the model's
Hugging Face source (torch), not an ONNX export.

Every key is checked (unknown keys, types, model sources, recipes, tasks, data files) and a bad one is
one NmOnnxError line naming it (`spec 'S': models[1].source: ...`), before torch is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from nm_onnx.autotune.spec import DEFAULT_CANDIDATES
from nm_onnx.errors import NmOnnxError

DENSE = "dense"  # the recipe name of the baseline row every model gets

EVALUATIONS = {  # evaluation -> {key: (type, default)}
    "perplexity": {"windows": (int, 8), "seqlen": (int, 512), "data": (str, "wikitext2")},
    "lm_eval": {"tasks": (list, None), "limit": (int, 0), "batch_size": (int, 1)},
    "bench": {"prompt": (int, 128), "decode": (int, 32), "repeats": (int, 3)},
    "twin": {"windows": (int, 1), "seqlen": (int, 512), "data": (str, "wikitext2")},
}
TORCH_ONLY = ("perplexity",)  # the evaluations a weight-pruning row gets (in PyTorch)
CALIBRATION = {"samples": (int, 16), "seqlen": (int, 256)}
AUTOTUNE = {  # `nm-onnx autotune`'s settings (nm_onnx.autotune.run.autotune keywords) a spec may set
    "candidates": (str, DEFAULT_CANDIDATES), "base_recipe": (str, "8:16-magnitude"),
    "samples": (int, 8), "seqlen": (int, 256), "check": (int, 8), "limit": (int, 8), "eval_seqlen": (int, 512),
    "eval_data": (str, "wikitext2"),
    "prompt": (int, 128), "decode": (int, 32), "repeats": (int, 3), "speed_repeats": (int, 200),
    "max_rounds": (int, 3),
}
TOP_KEYS = ("models", "recipes", "evaluations", "calibration", "autotune", "threads")
RECIPE_KINDS = ("recipe", "dense", "autotune", "weight")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str
    onnx: bool  # the source is an ONNX export (optimum or GenAI): used as the dense model, never re-exported
    export: str | None = None  # an existing export of a Hugging Face source: the dense model (not re-exported)


@dataclass(frozen=True)
class RecipeEntry:
    name: str
    source: str  # preset name or recipe file path ("dense"; the budget of autotune; the pattern of weight)
    kind: str = "recipe"  # one of RECIPE_KINDS


@dataclass
class SweepSpec:
    path: Path
    models: list[ModelEntry]
    recipes: list[RecipeEntry]  # the dense baseline first
    evaluations: dict[str, dict] = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    threads: int | None = None
    autotune: dict = field(default_factory=dict)

    def inputs(self) -> list[str]:
        """Paths the sweep reads (the output may not be, contain or lie inside any of them)."""
        paths = [str(self.path)]
        paths += [p for m in self.models for p in (m.source, m.export) if p and Path(p).exists()]
        paths += [r.source for r in self.recipes if r.kind == "recipe" and Path(r.source).exists()]
        if any(r.kind == "autotune" for r in self.recipes) and Path(self.autotune["base_recipe"]).exists():
            paths.append(self.autotune["base_recipe"])
        return paths


def _read(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise NmOnnxError(f"cannot read the sweep spec '{path}': {e.strerror or type(e).__name__}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise NmOnnxError(f"spec '{path}' is YAML but pyyaml is not installed; write it as TOML") from None
        try:
            d = yaml.safe_load(raw.decode("utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise NmOnnxError(f"spec '{path}' is not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        import tomllib

        try:
            d = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise NmOnnxError(f"spec '{path}' is not valid TOML: {e}") from None
    if not isinstance(d, dict):
        raise NmOnnxError(f"spec '{path}': the top level must be a table of {', '.join(TOP_KEYS)}")
    return d


def _typed(where: str, value, typ):
    if typ is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise NmOnnxError(f"{where}: expected a non-negative integer, got {value!r}")
    if typ is str and not isinstance(value, str):
        raise NmOnnxError(f"{where}: expected a string, got {value!r}")
    if typ is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise NmOnnxError(f"{where}: expected a non-empty list of names, got {value!r}")
    return value


def _table(where: str, d, schema: dict) -> dict:
    if not isinstance(d, dict):
        raise NmOnnxError(f"{where}: expected a table, got {d!r}")
    bad = sorted(set(d) - set(schema))
    if bad:
        raise NmOnnxError(f"{where}.{bad[0]}: unknown key; use {', '.join(schema)}")
    out = {}
    for key, (typ, default) in schema.items():
        if key in d:
            out[key] = _typed(f"{where}.{key}", d[key], typ)
        elif default is None:
            raise NmOnnxError(f"{where}.{key}: missing")
        else:
            out[key] = default
    return out


def _is_onnx_export(p: Path) -> bool:
    from nm_onnx.genai import is_genai_dir

    return p.is_dir() and ((p / "model.onnx").is_file() or is_genai_dir(p))


def _model(where: str, item, base: Path) -> ModelEntry:
    from nm_onnx.models import check_model_source

    if isinstance(item, str):
        item = {"source": item}
    d = _table(where, item, {"name": (str, ""), "source": (str, None), "export": (str, "")})
    src = _local(d["source"], base)
    onnx = _is_onnx_export(Path(src))
    if not onnx:
        try:
            check_model_source(src)
        except NmOnnxError as e:
            raise NmOnnxError(f"{where}.source: {e} (or an ONNX export directory)") from None
    export = _local(d["export"], base) if d["export"] else None
    if export is not None:
        if onnx:
            raise NmOnnxError(f"{where}.export: the source is already an ONNX export; drop export")
        if not _is_onnx_export(Path(export)):
            raise NmOnnxError(f"{where}.export: '{d['export']}' is not an ONNX export directory "
                              "(model.onnx or genai_config.json); run `nm-onnx export` or drop export")
    name = d["name"] or (Path(src).name if Path(src).exists() else src)
    return ModelEntry(name, src, onnx, export)


def _local(src: str, base: Path) -> str:
    """A relative path that exists beside the spec (and not here) is read from there."""
    p = Path(src).expanduser()
    return str(base / p) if not p.is_absolute() and not p.exists() and (base / p).exists() else src


def _text_file(where: str, data: str, base: Path) -> str:
    """The path of an evaluation text file (here or beside the spec), or NmOnnxError naming `where`."""
    f = Path(_local(data, base)).expanduser()
    if not f.is_file():
        raise NmOnnxError(f"{where}: '{data}' is neither 'wikitext2' nor an existing text file")
    return str(f)


def _recipe(where: str, item, base: Path) -> RecipeEntry:
    from nm_onnx.recipe import SparsityRecipe

    if isinstance(item, str):
        item = {"source": item}
    d = _table(where, item, {"name": (str, ""), "source": (str, None)})
    src = d["source"]
    kind, _, arg = src.partition(":")
    if kind == "autotune" and arg:
        from nm_onnx.autotune.spec import parse_budget

        try:
            budget = str(parse_budget(arg))
        except NmOnnxError as e:
            raise NmOnnxError(f"{where}.source: {e}") from None
        return RecipeEntry(d["name"] or f"autotune {budget}", budget, "autotune")
    if kind == "weight" and arg:
        from nm_onnx.recipe import parse_pattern

        try:
            n, _, _ = parse_pattern(arg)
        except NmOnnxError as e:
            raise NmOnnxError(f"{where}.source: {e}") from None
        if n is None:
            raise NmOnnxError(f"{where}.source: weight pruning needs an N:M pattern, got '{arg}'")
        return RecipeEntry(d["name"] or f"{arg} weight pruning", arg, "weight")
    if src == DENSE:
        return RecipeEntry(DENSE, DENSE, "dense")
    src = _local(src, base)
    try:
        SparsityRecipe.load(src).validate()
    except NmOnnxError as e:
        raise NmOnnxError(f"{where}.source: {e} (or autotune:BUDGET, weight:N:M)") from None
    default = Path(src).stem if Path(src).is_file() else src  # a file: its stem; a preset: its name
    return RecipeEntry(d["name"] or default, src)


def _unique(where: str, names: list[str]) -> None:
    seen = set()
    for i, n in enumerate(names):
        if n in seen:
            raise NmOnnxError(f"{where}[{i}].name: '{n}' is used twice; give each a distinct name")
        seen.add(n)


def load_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and check a sweep spec (NmOnnxError naming the first bad key)."""
    path = Path(path)
    d = _read(path)
    base = path.resolve().parent
    w = f"spec '{path}'"
    bad = sorted(set(d) - set(TOP_KEYS))
    if bad:
        raise NmOnnxError(f"{w}: {bad[0]}: unknown key; use {', '.join(TOP_KEYS)}")
    for key in ("models", "recipes", "evaluations"):
        if key not in d:
            raise NmOnnxError(f"{w}: {key}: missing")
    for key in ("models", "recipes"):
        if not isinstance(d[key], list) or not d[key]:
            raise NmOnnxError(f"{w}: {key}: expected a non-empty list")
    models = [_model(f"{w}: models[{i}]", m, base) for i, m in enumerate(d["models"])]
    _unique(f"{w}: models", [m.name for m in models])
    recipes = [_recipe(f"{w}: recipes[{i}]", r, base) for i, r in enumerate(d["recipes"])]
    recipes = [RecipeEntry(DENSE, DENSE, "dense")] + [r for r in recipes if r.kind != "dense"]
    _unique(f"{w}: recipes", [r.name for r in recipes])
    ev = d["evaluations"]
    if not isinstance(ev, dict) or not ev:
        raise NmOnnxError(f"{w}: evaluations: expected a table with any of {', '.join(EVALUATIONS)}")
    bad = sorted(set(ev) - set(EVALUATIONS))
    if bad:
        raise NmOnnxError(f"{w}: evaluations.{bad[0]}: unknown evaluation; use {', '.join(EVALUATIONS)}")
    evaluations = {k: _table(f"{w}: evaluations.{k}", ev[k], EVALUATIONS[k]) for k in EVALUATIONS if k in ev}
    _check_evaluations(w, evaluations, base)
    calibration = _table(f"{w}: calibration", d.get("calibration", {}), CALIBRATION)
    autotune = _table(f"{w}: autotune", d.get("autotune", {}), AUTOTUNE)
    if any(r.kind == "autotune" for r in recipes):
        _check_autotune(f"{w}: autotune", autotune, base)
    needs_torch = [r.name for r in recipes if r.kind in ("autotune", "weight")] + (["twin"] if "twin" in ev else [])
    for i, m in enumerate(models):
        if m.onnx and needs_torch:
            raise NmOnnxError(f"{w}: models[{i}].source: '{m.source}' is an ONNX export, but {needs_torch[0]} "
                              "runs the PyTorch model: give its Hugging Face source (and export = the export)")
    threads = d.get("threads")
    if threads is not None:
        _typed(f"{w}: threads", threads, int)
    return SweepSpec(path, models, recipes, evaluations, calibration, threads or None, autotune)


def _check_autotune(w: str, a: dict, base: Path) -> None:
    from nm_onnx.autotune.run import check_base_recipe
    from nm_onnx.autotune.spec import parse_candidates
    from nm_onnx.recipe import SparsityRecipe

    try:
        a["candidates"] = ",".join(parse_candidates(a["candidates"]))
    except NmOnnxError as e:
        raise NmOnnxError(f"{w}.candidates: {e}") from None
    a["base_recipe"] = _local(a["base_recipe"], base)
    if a["eval_data"] != "wikitext2":
        a["eval_data"] = _text_file(f"{w}.eval_data", a["eval_data"], base)
    try:
        check_base_recipe(SparsityRecipe.load(a["base_recipe"]).validate())
    except NmOnnxError as e:
        raise NmOnnxError(f"{w}.base_recipe: {e}") from None
    for key in ("samples", "limit", "prompt", "decode", "repeats", "speed_repeats", "max_rounds"):
        if a[key] < 1:
            raise NmOnnxError(f"{w}.{key}: must be at least 1, got {a[key]}")
    for key in ("seqlen", "eval_seqlen"):
        if a[key] < 2:
            raise NmOnnxError(f"{w}.{key}: must be at least 2, got {a[key]}")


def _check_evaluations(w: str, ev: dict, base: Path) -> None:
    for kind in ("perplexity", "twin"):
        if kind not in ev:
            continue
        p = ev[kind]
        if p["seqlen"] < 2:
            raise NmOnnxError(f"{w}: evaluations.{kind}.seqlen: must be at least 2, got {p['seqlen']}")
        if kind == "twin" and p["windows"] < 1:
            raise NmOnnxError(f"{w}: evaluations.twin.windows: must be at least 1 (the reference is slow: 1-2)")
        if p["data"] != "wikitext2":
            p["data"] = _text_file(f"{w}: evaluations.{kind}.data", p["data"], base)
    if "lm_eval" in ev:
        from nm_onnx.evaluation.tasks import parse_tasks

        try:
            ev["lm_eval"]["tasks"] = parse_tasks(",".join(ev["lm_eval"]["tasks"]))
        except NmOnnxError as e:
            raise NmOnnxError(f"{w}: evaluations.lm_eval.tasks: {e}") from None
        if ev["lm_eval"]["batch_size"] < 1:
            raise NmOnnxError(f"{w}: evaluations.lm_eval.batch_size: must be at least 1")
    if "bench" in ev:
        b = ev["bench"]
        for key in ("prompt", "repeats"):
            if b[key] < 1:
                raise NmOnnxError(f"{w}: evaluations.bench.{key}: must be at least 1, got {b[key]}")
