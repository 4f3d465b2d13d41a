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


def tiny_qwen2_bias_hf() -> Path:
    """The tiny random Qwen2 with nonzero q/k/v biases (random init leaves them 0, and the GenAI
    builder then drops the bias Add)."""

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from nm_onnx.io import atomic_dir

        model = AutoModelForCausalLM.from_pretrained(tiny_hf("qwen2"))
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.1)
        with atomic_dir(out, "hf-model") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            AutoTokenizer.from_pretrained(tiny_hf("qwen2")).save_pretrained(tmp)

    return _locked_export("tiny-qwen2-bias-hf", build, marker="config.json")


def tiny_genai(arch: str = "llama", precision: str = "fp32", **extra_options) -> Path:
    """ORT GenAI directory of the tiny random `arch` model (or "qwen2-bias"), built by the real builder.

    Keyed by content: the HF directory's files, the builder's pins (requirements-genai-builder.txt),
    the precision and the builder's extra options; a changed input builds a new entry.
    """
    import hashlib
    import json

    from nm_onnx.export_genai import PRECISIONS, export_genai
    from nm_onnx.genai import BUILDER_REQUIREMENTS
    from nm_onnx.ops.library import REPO_ROOT

    src = tiny_qwen2_bias_hf() if arch == "qwen2-bias" else tiny_hf(arch)
    h = hashlib.sha256()
    for f in sorted(p for p in src.iterdir() if p.is_file() and p.name != "nm_onnx_manifest.json"):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update((REPO_ROOT / BUILDER_REQUIREMENTS).read_bytes())
    h.update(json.dumps([precision, extra_options], sort_keys=True).encode())
    name = f"genai-{arch}-{precision}-{h.hexdigest()[:12]}"
    assert precision in PRECISIONS, precision
    return _locked_export(name, lambda out: export_genai(src, out, precision=precision, extra_options=extra_options))


def wide_export() -> Path:
    """Export (KV cache) of a small random Llama with wide linears (hidden 768, MLP 2048, 2 layers), big
    enough that NMSparseMatMul beats dense MatMul at T = 1 (the autotune end-to-end test needs sites
    where sparsity saves time; at hidden 64 the op's fixed cost dominates)."""

    def build_hf(out: Path) -> None:
        import torch
        import transformers as tf

        from nm_onnx.io import atomic_dir
        from nm_onnx.models import _tiny_tokenizer

        cfg = tf.LlamaConfig(vocab_size=512, hidden_size=768, intermediate_size=2048, num_hidden_layers=2,
                             num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=256,
                             tie_word_embeddings=False)
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(cfg).eval()
        with atomic_dir(out, "hf-model") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            _tiny_tokenizer(cfg.vocab_size).save_pretrained(tmp)

    hf = _locked_export("wide-llama-hf", build_hf, marker="config.json")
    return _locked_export("wide-llama", lambda out: export(hf, out))
