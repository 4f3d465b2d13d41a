"""`nm-onnx export MODEL OUT_DIR`: optimum export of a causal LM (KV cache by default)."""

from nm_onnx.commands._args import add_overwrite, at_least
from nm_onnx.export import DEFAULT_OPSET

NAME = "export"
HELP = "Export a Hugging Face causal LM (alias, HF directory or .gguf) to ONNX with optimum."


def add_arguments(p):
    p.add_argument("model", help="model alias (smollm2-135m), local HF directory or .gguf file")
    p.add_argument("out_dir", help="output directory (optimum layout: model.onnx + config + tokenizer)")
    p.add_argument("--no-past", action="store_true", help="export without KV cache (task text-generation)")
    p.add_argument("--opset", type=at_least(14), default=DEFAULT_OPSET,
                   help=f"ONNX opset (default {DEFAULT_OPSET}; >= 18 for --portable transforms)")
    add_overwrite(p)


def run(args) -> int:
    from nm_onnx.export import export

    path = export(args.model, args.out_dir, with_past=not args.no_past, opset=args.opset,
                  overwrite=args.overwrite)
    print(path)
    return 0
