"""The sweep spec: models x recipes x evaluations, read from TOML (or YAML) and checked before any work.

    [[models]]                       # or models = ["smollm2-135m", "path/to/hf"]
    name = "llama"                   # optional (default: the source's last path part)
    source = "path/to/hf-dir"        # alias, HF directory, .gguf, optimum or GenAI export directory

    recipes = ["8:16-magnitude", "recipes/mine.json"]   # presets or recipe files; dense always runs

    [calibration]                    # optional: the budget of recipes that need constants
    samples = 16
    seqlen = 256

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

Every key is checked (unknown keys, types, model sources, recipes, tasks, data files) and a bad one is
one NmOnnxError line naming it (`spec 'S': models[1].source: ...`), before torch is imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from nm_onnx.errors import NmOnnxError

DENSE = "dense"  # the recipe name of the baseline row every model gets

EVALUATIONS = {  # evaluation -> {key: (type, default)}
    "perplexity": {"windows": (int, 8), "seqlen": (int, 512), "data": (str, "wikitext2")},
    "lm_eval": {"tasks": (list, None), "limit": (int, 0), "batch_size": (int, 1)},
    "bench": {"prompt": (int, 128), "decode": (int, 32), "repeats": (int, 3)},
}
CALIBRATION = {"samples": (int, 16), "seqlen": (int, 256)}
TOP_KEYS = ("models", "recipes", "evaluations", "calibration", "threads")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str
    onnx: bool  # an existing ONNX export (optimum or GenAI): used as the dense model, never re-exported


@dataclass(frozen=True)
class RecipeEntry:
    name: str
    source: str  # preset name or recipe file path ("dense" for the baseline)


@dataclass
class SweepSpec:
    path: Path
    models: list[ModelEntry]
    recipes: list[RecipeEntry]  # the dense baseline first
    evaluations: dict[str, dict] = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    threads: int | None = None

    def inputs(self) -> list[str]:
        """Paths the sweep reads (the output may not be, contain or lie inside any of them)."""
        paths = [str(self.path)]
        paths += [m.source for m in self.models if Path(m.source).exists()]
        paths += [r.source for r in self.recipes if r.source != DENSE and Path(r.source).exists()]
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
    d = _table(where, item, {"name": (str, ""), "source": (str, None)})
    src = d["source"]
    p = Path(src).expanduser()
    if not p.is_absolute() and not p.exists() and (base / p).exists():
        src, p = str(base / p), base / p
    onnx = _is_onnx_export(p)
    if not onnx:
        try:
            check_model_source(src)
        except NmOnnxError as e:
            raise NmOnnxError(f"{where}.source: {e} (or an ONNX export directory)") from None
    name = d["name"] or (Path(src).name if Path(src).exists() else src)
    return ModelEntry(name, src, onnx)


def _recipe(where: str, item, base: Path) -> RecipeEntry:
    from nm_onnx.recipe import SparsityRecipe

    if isinstance(item, str):
        item = {"source": item}
    d = _table(where, item, {"name": (str, ""), "source": (str, None)})
    src = d["source"]
    if src != DENSE:
        p = Path(src).expanduser()
        if not p.is_absolute() and not p.exists() and (base / p).exists():
            src = str(base / p)
        try:
            SparsityRecipe.load(src).validate()
        except NmOnnxError as e:
            raise NmOnnxError(f"{where}.source: {e}") from None
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
    recipes = [RecipeEntry(DENSE, DENSE)] + [r for r in recipes if r.source != DENSE]
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
    threads = d.get("threads")
    if threads is not None:
        _typed(f"{w}: threads", threads, int)
    return SweepSpec(path, models, recipes, evaluations, calibration, threads or None)


def _check_evaluations(w: str, ev: dict, base: Path) -> None:
    if "perplexity" in ev:
        p = ev["perplexity"]
        if p["seqlen"] < 2:
            raise NmOnnxError(f"{w}: evaluations.perplexity.seqlen: must be at least 2, got {p['seqlen']}")
        data = p["data"]
        if data != "wikitext2":
            f = Path(data).expanduser()
            f = f if f.is_absolute() or f.exists() else base / f
            if not f.is_file():
                raise NmOnnxError(f"{w}: evaluations.perplexity.data: '{data}' is neither 'wikitext2' nor an "
                                  "existing text file")
            p["data"] = str(f)
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
