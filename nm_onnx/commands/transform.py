"""`nm-onnx transform IN OUT --recipe R [--calibration DIR] [--no-fuse] [--portable] [--quantize int4|int8]
[--prefill-dispatch ROWS]`."""

from nm_onnx.commands._args import add_overwrite, positive

NAME = "transform"
HELP = "Rewrite an exported model with N:M activation sparsity ops (shift, mask, sparse MatMul)."


def add_arguments(p):
    p.add_argument("input", help="dense model: an .onnx file or an optimum export directory")
    p.add_argument("output", help="output .onnx file (or directory, for a directory input)")
    p.add_argument("--recipe", required=True, help="recipe JSON file, preset name (`nm-onnx recipes`) or artifact dir")
    p.add_argument("--calibration", default=None, help="calibration artifact directory (`nm-onnx calibrate`)")
    p.add_argument("--no-fuse", action="store_true", help="keep the unfused TokenShift/NMMask/MatMul form")
    p.add_argument("--portable", action="store_true",
                   help="attach standard-ONNX function bodies so the model runs without the op library")
    p.add_argument("--quantize", choices=("int4", "int8"), default=None,
                   help="quantize the float linear sites first (round-to-nearest, blocks along K, the MatMulNBits "
                        "scheme): sparse sites become NMSparseMatMulNBits, dense ones MatMulNBits")
    p.add_argument("--quant-block-size", type=int, default=32, help="--quantize block size along K (default 32)")
    p.add_argument("--quant-asymmetric", action="store_true",
                   help="--quantize with uint8 zero points (default symmetric)")
    p.add_argument("--prefill-dispatch", type=positive, default=None, metavar="ROWS",
                   help="above ROWS token rows (batch x sequence) run ORT's dense MatMul on the masked activation "
                        "instead of the sparse kernel (prompts at dense speed, decode unchanged; 2 for SmolLM2-sized "
                        "models, 4-8 for 2048x8192 MLPs); costs a second copy of the sparse weights in memory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_overwrite(p)


def run(args) -> int:
    import json

    from nm_onnx.transform import transform

    report = transform(args.input, args.output, args.recipe, args.calibration,
                       fuse=not args.no_fuse, portable=args.portable, overwrite=args.overwrite,
                       quantize=args.quantize, quant_block_size=args.quant_block_size,
                       quant_symmetric=not args.quant_asymmetric, prefill_dispatch=args.prefill_dispatch)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return 0
