"""A Hugging Face directory of a SmolLM2-1.7B-shaped Llama with random weights (for the speed benchmarks).

hidden 2048, 24 layers, MLP 8192, 32 heads (32 KV heads), vocab 49152, tied embeddings: the shapes of
SmolLM2-1.7B, about 1.7 G parameters (6.8 GB in float32). The weights are random (normal, std 0.02,
seed 0): the kernels' work depends on the shapes, not the values, so decode speed is that of the real
model; perplexity is meaningless. The tokenizer files are SmolLM2-135M's (the same vocabulary).

    .venv/bin/python benchmarks/random_hf.py runs/hf-1.7b-random
    .venv/bin/nm-onnx export runs/hf-1.7b-random runs/g-1.7b-int4 --format genai --precision int4
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

SHAPE = {"hidden_size": 2048, "num_hidden_layers": 24, "intermediate_size": 8192, "num_attention_heads": 32,
         "num_key_value_heads": 32, "vocab_size": 49152, "head_dim": 64}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="output directory (must not exist)")
    ap.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"])
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"random_hf: '{out}' exists; remove it or choose another directory", file=sys.stderr)
        return 2
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from nm_onnx.io import atomic_dir
    from nm_onnx.models import resolve_model

    tokenizer_src = Path(resolve_model("smollm2-135m"))
    config = LlamaConfig(**{**SHAPE, "num_hidden_layers": args.layers}, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=130000.0, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2, torch_dtype="float32")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty unties lm_head from the embedding
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    n = sum(p.numel() for p in model.parameters())
    print(f"random_hf: {n / 1e9:.2f} G parameters, saving to {out} ...", file=sys.stderr)
    with atomic_dir(out, "random-hf") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in TOKENIZER_FILES:
            if (tokenizer_src / f).is_file():
                shutil.copy2(tokenizer_src / f, tmp / f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
