"""The calibration artifact: a directory with recipe.json, constants.safetensors and report.json.

constants.safetensors holds float32 tensors keyed `<module path>.<constant>`, constant one of
static_shift ([1]), channel_scale ([K]), learned_shift ([K]), scale_a ([O]), scale_b ([O]).
report.json records the recipe digest, the data used and per-layer losses. The directory is written
atomically (it appears only when complete) and a missing or corrupt one is a clear NmOnnxError.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nm_onnx.errors import NmOnnxError
from nm_onnx.io import atomic_dir
from nm_onnx.method import CONSTANT_NAMES
from nm_onnx.recipe import SparsityRecipe

RECIPE_FILE = "recipe.json"
CONSTANTS_FILE = "constants.safetensors"
REPORT_FILE = "report.json"


def split_key(key: str) -> tuple[str, str]:
    module, _, name = key.rpartition(".")
    if not module or name not in CONSTANT_NAMES:
        raise NmOnnxError(f"bad constant key '{key}' (expected '<module path>.<{'|'.join(CONSTANT_NAMES)}>')")
    return module, name


@dataclass
class CalibrationArtifact:
    recipe: SparsityRecipe
    tensors: dict[str, np.ndarray]
    report: dict = field(default_factory=dict)
    path: Path | None = None

    def modules(self) -> list[str]:
        """Module paths that carry at least one constant, in key order."""
        seen: dict[str, None] = {}
        for key in self.tensors:
            seen.setdefault(split_key(key)[0], None)
        return list(seen)

    def site_shapes(self) -> dict[str, tuple[int, int]] | None:
        """{module path: (K, O)} of every site the artifact was calibrated for (None for old artifacts)."""
        sites = self.report.get("sites") if isinstance(self.report, dict) else None
        if not isinstance(sites, dict):
            return None
        return {m: (int(v[0]), int(v[1])) for m, v in sites.items()}

    def constants(self, module: str) -> dict[str, np.ndarray]:
        """{constant name: float32 array} for one module path (empty if it has none)."""
        prefix = module + "."
        return {
            key[len(prefix):]: value
            for key, value in self.tensors.items()
            if key.startswith(prefix) and key[len(prefix):] in CONSTANT_NAMES
        }

    def digest(self) -> str:
        """sha256 over the recipe digest and every constant (sorted keys, shapes and bytes)."""
        h = hashlib.sha256(self.recipe.digest().encode())
        for key in sorted(self.tensors):
            a = np.ascontiguousarray(self.tensors[key], dtype=np.float32)
            h.update(key.encode())
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def save(self, out: str | os.PathLike, overwrite: bool = False, inputs=()) -> Path:
        """Write the artifact directory atomically (nm_onnx.io rules for an existing one); returns its path."""
        from safetensors.numpy import save_file

        for key in self.tensors:
            split_key(key)
        out = Path(out)
        report = dict(self.report)
        report["recipe_digest"] = self.recipe.digest()
        report["artifact_digest"] = self.digest()
        with atomic_dir(out, "calibration", overwrite, inputs=inputs) as tmp:
            (tmp / RECIPE_FILE).write_text(self.recipe.to_json() + "\n", encoding="utf-8")
            tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.tensors.items()}
            save_file(tensors, str(tmp / CONSTANTS_FILE), metadata={"recipe_digest": self.recipe.digest()})
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        self.path = out
        self.report = report
        return out


def load_artifact(path: str | os.PathLike) -> CalibrationArtifact:
    """Load a calibration artifact directory; NmOnnxError if it is missing, incomplete or corrupt."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise NmOnnxError(
            f"calibration artifact '{p}' is a file; --calibration takes the directory `nm-onnx calibrate --out` wrote"
        )
    if not p.is_dir():
        raise NmOnnxError(f"calibration artifact '{p}' does not exist; create it with `nm-onnx calibrate`")
    for name in (RECIPE_FILE, CONSTANTS_FILE, REPORT_FILE):
        if not (p / name).is_file():
            raise NmOnnxError(f"calibration artifact '{p}' is incomplete: {name} is missing; re-run `nm-onnx calibrate`")
    recipe = SparsityRecipe.from_json((p / RECIPE_FILE).read_text(encoding="utf-8"), origin=f"'{p / RECIPE_FILE}'")
    try:
        report = json.loads((p / REPORT_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NmOnnxError(f"calibration artifact '{p}': corrupt {REPORT_FILE} ({e})") from None
    try:
        from safetensors.numpy import load_file

        tensors = load_file(str(p / CONSTANTS_FILE))
    except Exception as e:  # noqa: BLE001  safetensors raises several types for truncated/garbage files
        raise NmOnnxError(f"calibration artifact '{p}': corrupt {CONSTANTS_FILE} ({type(e).__name__}: {e})") from None
    for key, value in tensors.items():
        split_key(key)
        if value.dtype != np.float32:
            raise NmOnnxError(f"calibration artifact '{p}': constant '{key}' is {value.dtype}, expected float32")
    art = CalibrationArtifact(recipe=recipe, tensors=dict(tensors), report=report, path=p)
    if isinstance(report, dict) and report.get("recipe_digest") not in (None, recipe.digest()):
        raise NmOnnxError(f"calibration artifact '{p}': recipe.json does not match the recipe it was calibrated with")
    if isinstance(report, dict) and report.get("artifact_digest") not in (None, art.digest()):
        raise NmOnnxError(f"calibration artifact '{p}': constants do not match report.json (modified or corrupt)")
    return art
