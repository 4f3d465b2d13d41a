"""Exports shared by the test suite, cached on disk so re-runs skip the ~30 s optimum export.

Cache: `$NM_ONNX_CACHE/test-exports/<name>` (default ~/.cache/nm-onnx). An export is keyed by its
source and parameters and rebuilt when missing; the export itself is atomic, so a killed run never
leaves a half-written cache entry.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from nm_onnx.export import export
from nm_onnx.models import cache_dir, tiny_random_model


def _locked_export(name: str, build, marker: str = "model.onnx") -> Path:
    root = cache_dir() / "test-exports"
    root.mkdir(parents=True, exist_ok=True)
    out = root / name
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / marker).is_file():
            build(out)
    return out


def smollm2_export(with_past: bool = True) -> Path:
    """Directory of the optimum export of the embedded SmolLM2 (KV cache unless with_past=False)."""
    name = "smollm2-135m" + ("" if with_past else "-nopast")
    return _locked_export(name, lambda out: export("smollm2-135m", out, with_past=with_past))


def tiny_export(arch: str, with_past: bool = True) -> Path:
    """Directory of the optimum export of a tiny random `arch` model (seed 0)."""
    name = f"tiny-{arch}" + ("" if with_past else "-nopast")

    def build(out: Path) -> None:
        src = cache_dir() / "test-exports" / f"tiny-{arch}-hf"
        if not (src / "config.json").is_file():
            tiny_random_model(arch, src)
        export(src, out, with_past=with_past)

    return _locked_export(name, build)


def tiny_hf(arch: str, bos: bool = False) -> Path:
    """HF directory of a tiny random `arch` model (bos=True: its tokenizer adds a BOS token)."""
    name = f"tiny-{arch}{'-bos' if bos else ''}-hf"
    src = cache_dir() / "test-exports" / name
    if not (src / "config.json").is_file():
        _locked_export(name, lambda out: tiny_random_model(arch, out, bos=bos), marker="config.json")
    return src


def tiny_bos_export(arch: str = "llama") -> Path:
    """Export (KV cache) of the tiny random `arch` model whose tokenizer adds a BOS token."""
    return _locked_export(f"tiny-{arch}-bos", lambda out: export(tiny_hf(arch, bos=True), out))
