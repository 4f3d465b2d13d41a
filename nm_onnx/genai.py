"""ONNX Runtime GenAI model directories: what one is and how our op library gets into it.

A GenAI directory (written by ORT GenAI's model builder) holds `genai_config.json`, the decoder
graph it names (`model.decoder.filename`, usually model.onnx, with external data) and tokenizer
files. `og.Model(dir)` loads it; a custom op library is named in
`model.decoder.session_options.custom_ops_library`. ORT GenAI refuses a path with `..` and one outside
the model folder (or an EP library folder, or the working directory), and resolves a bare file name
in the model folder: a transformed directory therefore carries its own copy of the library and names
it by file name only (docs/genai.md).

The model builder needs transformers 5 while optimum-onnx pins transformers < 4.58, so it runs in
its own environment (`make genai-env` -> .venv-genai, pins in requirements-genai-builder.txt);
`$NM_ONNX_GENAI_PYTHON` points at another Python that has it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nm_onnx.errors import NmOnnxError

CONFIG = "genai_config.json"
PRODUCER = "onnxruntime-genai"  # producer_name of the builder's graphs
BUILDER_MODULE = "onnxruntime_genai.models.builder"
BUILDER_REQUIREMENTS = "requirements-genai-builder.txt"
BUILDER_ENV_DIR = ".venv-genai"
BUILDER_ENV_VAR = "NM_ONNX_GENAI_PYTHON"
BUILDER_SETUP = "make genai-env"


def is_genai_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding a genai_config.json."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file()


def read_config(directory: str | os.PathLike) -> dict:
    """The parsed genai_config.json of `directory` (NmOnnxError if unreadable or not a GenAI config)."""
    f = Path(directory) / CONFIG
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except OSError as e:
        from nm_onnx.io import os_error

        raise os_error(e, f) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise NmOnnxError(f"'{f}' is not valid JSON ({e}); rebuild the GenAI model") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model", {}).get("decoder"), dict):
        raise NmOnnxError(f"'{f}' has no model.decoder section: not an ORT GenAI config")
    return cfg


def decoder_file(directory: str | os.PathLike) -> Path:
    """The decoder graph a GenAI directory's config names (it must exist)."""
    name = read_config(directory)["model"]["decoder"].get("filename", "model.onnx")
    p = Path(directory) / name
    if not p.is_file():
        raise NmOnnxError(f"'{Path(directory) / CONFIG}' names the decoder '{name}', which is missing")
    return p


def head_size(directory: str | os.PathLike) -> int | None:
    """model.decoder.head_size of a GenAI directory (the KV cache's last axis), or None."""
    v = read_config(directory)["model"]["decoder"].get("head_size")
    return int(v) if isinstance(v, int) else None


def with_custom_ops_library(cfg: dict, library_name: str) -> dict:
    """`cfg` with model.decoder.session_options.custom_ops_library = library_name (a bare file name).

    A config that already names another library is refused: ORT GenAI takes one library per session.
    """
    if os.sep in library_name or ".." in library_name:
        raise ValueError(f"custom_ops_library must be a bare file name, got {library_name!r}")
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    have = so.get("custom_ops_library")
    if have and Path(str(have)).name != library_name:
        raise NmOnnxError(
            f"the GenAI config already loads the custom op library '{have}'; ORT GenAI loads one library per "
            "session: remove that entry from genai_config.json first"
        )
    so["custom_ops_library"] = library_name
    return cfg


def builder_python() -> Path:
    """The Python that runs ORT GenAI's model builder (NmOnnxError saying how to create it)."""
    from nm_onnx.ops.library import REPO_ROOT

    env = os.environ.get(BUILDER_ENV_VAR)
    py = Path(env) if env else REPO_ROOT / BUILDER_ENV_DIR / "bin" / "python"
    found = py.is_file() and (env is not None or any(  # the venv layout: look for the builder's file
        (sp / "onnxruntime_genai" / "models" / "builder.py").is_file()
        for sp in (py.parent.parent / "lib").glob("python3*/site-packages")))
    if not found:
        where = f"${BUILDER_ENV_VAR}={env}" if env else str(REPO_ROOT / BUILDER_ENV_DIR)
        raise NmOnnxError(
            f"ORT GenAI's model builder environment is missing ({where}); create it with "
            f"`cd {REPO_ROOT} && {BUILDER_SETUP}` (it needs transformers 5, which cannot share the main venv), "
            f"or point ${BUILDER_ENV_VAR} at a Python with the packages of {BUILDER_REQUIREMENTS}"
        )
    return py
