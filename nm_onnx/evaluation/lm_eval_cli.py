"""`python -m nm_onnx.evaluation.lm_eval_cli ...`: lm-eval's own CLI with the `nm-onnx` model type.

lm-eval discovers model types only through its registry, so this entry point imports our adapter
(which registers `nm-onnx`) and points `--include_path` at the offline task YAMLs (arc_easy,
arc_challenge, boolq, piqa read from the shared data folder), then hands over to lm-eval:

    python -m nm_onnx.evaluation.lm_eval_cli run --model nm-onnx --model_args path=runs/demo/dense \\
        --tasks arc_easy --limit 20
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import nm_onnx.evaluation.lm_eval_adapter  # noqa: F401 - registers the model type (and goes offline)
    from nm_onnx.evaluation.tasks import task_dir

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in argv and any(a in ("--tasks", "-t") for a in argv):
        argv += ["--include_path", str(task_dir())]
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
