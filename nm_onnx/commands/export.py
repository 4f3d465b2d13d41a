"""`nm-onnx export MODEL OUT_DIR`: optimum export of a causal LM (KV cache by default)."""

from nm_onnx.export import DEFAULT_OPSET, export

NAME = "export"
HELP = "Export a Hugging Face causal LM (alias, HF directory or .gguf) to ONNX with optimum."


def add_arguments(p):
    p.add_argument("model", help="model alias (smollm2-135m), local HF directory or .gguf file")
    p.add_argument("out_dir", help="output directory (optimum layout: model.onnx + config + tokenizer)")
    p.add_argument("--no-past", action="store_true", help="export without KV cache (task text-generation)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")


def run(args) -> int:
    path = export(args.model, args.out_dir, with_past=not args.no_past, opset=args.opset)
    print(path)
    return 0
