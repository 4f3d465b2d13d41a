"""`nm-onnx sweep SPEC --out DIR [--backend local|ray [--address ADDR]]`: see nm_onnx.sweep."""

from nm_onnx.commands._args import positive

NAME = "sweep"
HELP = "Run models x recipes x evaluations from a TOML/YAML spec as cached jobs; one aggregated report."


def add_arguments(p):
    p.add_argument("spec", help="sweep spec (.toml, or .yaml with pyyaml): models, recipes, evaluations")
    p.add_argument("--out", default="runs/sweep", help="sweep folder: cache and report (default runs/sweep)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local: jobs in this process; ray: one Ray task per job (pip install 'nm-onnx[cluster]')")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--cpus-per-job", type=positive, default=1, help="CPUs each Ray task declares (default 1)")
    p.add_argument("--fresh", action="store_true", help="recompute every job, ignoring the cache")
    p.add_argument("--overwrite", action="store_true",
                   help="use a non-empty --out that nm-onnx did not make (its files are left alone)")


def run(args) -> int:
    from nm_onnx.errors import NmOnnxError
    from nm_onnx.sweep import run_sweep

    if args.address and args.backend != "ray":
        raise NmOnnxError("--address is for --backend ray; add --backend ray or drop --address")
    rep = run_sweep(args.spec, args.out, args.backend, args.address, args.cpus_per_job, args.fresh, args.overwrite)
    if not rep["rows"]:
        return 2
    failed = rep["jobs"].get("failed", 0) + rep["jobs"].get("skipped", 0)
    if failed:  # the report is complete; its cells name the errors. Exit 1 so a script notices.
        import sys

        print(f"nm-onnx sweep: {failed} job(s) failed or were skipped (their cells say why)", file=sys.stderr)
        return 1
    return 0
