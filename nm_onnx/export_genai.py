"""Export a Hugging Face causal LM to an ONNX Runtime GenAI directory with ORT GenAI's model builder.

The builder (`python -m onnxruntime_genai.models.builder`) runs as a subprocess in its own
environment (nm_onnx.genai.builder_python: it needs transformers 5), offline, on the local HF
directory that `nm_onnx.models.resolve_model` gives (alias, HF dir or GGUF), for the CPU execution
provider. A byte-level BPE tokenizer.json that also says `byte_fallback` (what transformers writes
for the GGUF-converted SmolLM2) is rewritten without it, with the plain ByteLevel decoder: every byte
already has a byte-level token, so the ids do not change, but og.Tokenizer otherwise maps every space
to id -1. The output folder gets the project's usual safety (nm_onnx.io: checked before the slow
work, staged and renamed into place, a manifest) and is checked to load in an ORT session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

from nm_onnx.errors import NmOnnxError
from nm_onnx.genai import BUILDER_MODULE, CONFIG, builder_python, decoder_file

# int4 / int8: the builder's MatMulNBits weights (RTN, block 32, symmetric, accuracy level 4 on CPU),
# which transform turns into NMSparseMatMulNBits at sparse sites
PRECISIONS = ("fp32", "fp16", "int4", "int8")
KIND = "genai-export"
_SHOWN = ("Reading ", "Saving ONNX model", "Saving GenAI config")  # builder lines worth a progress line


def builder_command(python, hf_dir, out, cache, precision: str, extra_options: dict | None = None) -> list[str]:
    """The model builder's command line for a local HF directory (CPU execution provider)."""
    cmd = [str(python), "-m", BUILDER_MODULE, "-i", str(hf_dir), "-o", str(out), "-p", precision,
           "-e", "cpu", "-c", str(cache)]
    if extra_options:
        cmd += ["--extra_options", *(f"{k}={_option(v)}" for k, v in sorted(extra_options.items()))]
    return cmd


def _option(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def export_genai(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    precision: str = "fp32",
    overwrite: bool = False,
    extra_options: dict | None = None,
) -> Path:
    """Build the GenAI directory OUT_DIR from MODEL (alias, HF dir or .gguf); returns its decoder path.

    `extra_options`: the builder's --extra_options (e.g. {"fuse_mlp_gate_up": True}).
    """
    from nm_onnx.io import atomic_dir, check_output_dir, remove_stage, staging_dir
    from nm_onnx.models import resolve_model

    if precision not in PRECISIONS:
        raise NmOnnxError(
            f"precision {precision!r} is not supported for --format genai (choose {', '.join(PRECISIONS)})"
        )
    out_dir = Path(out_dir)
    given = [source] if Path(str(source)).exists() else []
    check_output_dir(out_dir, KIND, given, overwrite)
    python = builder_python()
    hf_dir = resolve_model(source)
    print(f"nm-onnx: building {source} with ORT GenAI's model builder ({precision}, cpu) ...", file=sys.stderr)
    with atomic_dir(out_dir, KIND, overwrite, inputs=[*given, hf_dir],
                    manifest={"format": "genai", "precision": precision}) as tmp:
        cache = staging_dir(tmp.parent, f"{out_dir.name}-builder-cache")  # the builder's scratch files
        try:
            _run_builder(builder_command(python, hf_dir, tmp, cache, precision, extra_options), source,
                         {str(tmp): str(out_dir)})
        finally:
            remove_stage(cache)
        if not (tmp / CONFIG).is_file():
            raise NmOnnxError(f"ORT GenAI's model builder wrote no {CONFIG} for {source}")
        model_path = decoder_file(tmp)
        _check_loads(model_path)
        if fix_byte_level_tokenizer(tmp / "tokenizer.json"):
            print("nm-onnx: tokenizer.json: byte-level BPE without byte_fallback (for og.Tokenizer; same ids)",
                  file=sys.stderr)
        (tmp / "nm_onnx_export.json").write_text(json.dumps(
            {"source": str(source), "format": "genai", "precision": precision, "execution_provider": "cpu",
             "extra_options": extra_options or {}, "builder": _builder_version(python)}, indent=2) + "\n")
    return out_dir / model_path.name


def _run_builder(cmd: list[str], source, shown_as: dict[str, str]) -> None:
    """Run the builder; its progress lines go to stderr, its full log to a file named on failure."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GIT_DIR=os.devnull,
               PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # the builder's own environment only (never this project's packages)
    tail: deque[str] = deque(maxlen=40)
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept on failure, named in the error
        "w", prefix="nm-onnx-genai-builder-", suffix=".log", delete=False)
    try:
        with log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                                   errors="replace", bufsize=1) as proc:
            assert proc.stdout is not None
            for raw in proc.stdout:
                log.write(raw)
                for line in raw.replace("\r", "\n").splitlines():
                    line = line.strip()
                    if line:
                        tail.append(line)
                    if line.startswith(_SHOWN):
                        for staged, final in shown_as.items():
                            line = line.replace(staged, final)
                        print(f"nm-onnx: builder: {line}", file=sys.stderr)
            rc = proc.wait()
    except OSError as e:
        raise NmOnnxError(f"cannot run ORT GenAI's model builder ({cmd[0]}): {e}") from None
    if rc != 0:
        why = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), tail[-1] if tail else "")
        raise NmOnnxError(
            f"ORT GenAI's model builder failed on {source} (exit {rc}): {why[:300]}; full log: {log.name}"
        )
    os.unlink(log.name)


def fix_byte_level_tokenizer(path: Path) -> bool:
    """Drop byte_fallback (and its decoders) from a byte-level BPE tokenizer.json; True if rewritten."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    model, pre = d.get("model") or {}, d.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    byte_level = [p for p in pres if isinstance(p, dict) and p.get("type") == "ByteLevel"]
    if model.get("type") != "BPE" or not model.get("byte_fallback") or not byte_level:
        return False
    model["byte_fallback"] = False
    dec = d.get("decoder") or {}
    decs = dec.get("decoders", []) if dec.get("type") == "Sequence" else [dec]
    d["decoder"] = next((x for x in decs if isinstance(x, dict) and x.get("type") == "ByteLevel"),
                        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True})
    path.write_text(json.dumps(d, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return True


def _builder_version(python) -> str | None:
    try:
        r = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('onnxruntime-genai'))"],
                           capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None


def _check_loads(path: Path) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NmOnnxError(f"the GenAI model does not load in onnxruntime: {first}") from None
