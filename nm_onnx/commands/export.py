"""`nm-onnx export MODEL OUT_DIR [--format optimum|genai]`: optimum export (KV cache by default), or an
ORT GenAI directory built by ORT GenAI's model builder (docs/genai.md)."""

from nm_onnx.commands._args import add_overwrite, at_least
from nm_onnx.errors import NmOnnxError
from nm_onnx.export import DEFAULT_OPSET

NAME = "export"
HELP = "Export a Hugging Face causal LM (alias, HF directory or .gguf) to ONNX (optimum or ORT GenAI)."
FORMATS = ("optimum", "genai")
GENAI_PRECISIONS = ("fp32", "fp16", "int4", "int8")  # = nm_onnx.export_genai.PRECISIONS (not imported: argparse runs first)


def add_arguments(p):
    p.add_argument("model", help="model alias (smollm2-135m), local HF directory or .gguf file")
    p.add_argument("out_dir", help="output directory (optimum: model.onnx + config + tokenizer; "
                                   "genai: genai_config.json + model.onnx + tokenizer)")
    p.add_argument("--format", choices=FORMATS, default="optimum",
                   help="optimum (default) or genai: ORT GenAI's model builder, run in its own environment "
                        "(`make genai-env`)")
    p.add_argument("--precision", choices=GENAI_PRECISIONS, default=None,
                   help="--format genai only: weight precision (default fp32; int4/int8: MatMulNBits block-quantized "
                        "weights, sparsified by transform into NMSparseMatMulNBits)")
    p.add_argument("--no-past", action="store_true", help="export without KV cache (task text-generation)")
    p.add_argument("--opset", type=at_least(14), default=None,
                   help=f"ONNX opset (default {DEFAULT_OPSET}; >= 18 for --portable transforms); optimum only")
    add_overwrite(p)


def run(args) -> int:
    if args.format == "genai":
        if args.no_past or args.opset is not None:
            raise NmOnnxError("--no-past and --opset apply to --format optimum only (the GenAI builder always "
                              "writes a KV-cache graph with its own opset)")
        from nm_onnx.export_genai import export_genai

        path = export_genai(args.model, args.out_dir, precision=args.precision or "fp32", overwrite=args.overwrite)
    else:
        if args.precision is not None:
            raise NmOnnxError("--precision applies to --format genai only (optimum exports keep the model's dtype)")
        from nm_onnx.export import export

        path = export(args.model, args.out_dir, with_past=not args.no_past,
                      opset=args.opset if args.opset is not None else DEFAULT_OPSET, overwrite=args.overwrite)
    print(path)
    return 0
