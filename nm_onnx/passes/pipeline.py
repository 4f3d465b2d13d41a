"""The pass pipeline of `nm-onnx transform`:
[pack] -> [quantize] -> locate -> insert -> [fuse] -> record -> [dispatch] -> finish
(pack: recipes with share_selection; dispatch: `--prefill-dispatch ROWS`, fused sites only)."""

from __future__ import annotations

import onnx_ir as ir

from nm_onnx.errors import NmOnnxError
from nm_onnx.passes.common import PassReport, SitePlan
from nm_onnx.passes.dispatch import DispatchPass
from nm_onnx.passes.finish import FinishPass
from nm_onnx.passes.fuse import FusePass
from nm_onnx.passes.insert import InsertPass
from nm_onnx.passes.locate import LocatePass
from nm_onnx.passes.pack import PackPass
from nm_onnx.passes.quantize import QuantizePass
from nm_onnx.passes.record import RecordPass

__all__ = ["PassReport", "SitePlan", "build_pipeline", "run_pipeline"]


def build_pipeline(recipe, calibration=None, fuse: bool = True, portable: bool = False, check: bool = True,
                   quantize: tuple[int, int, bool] | None = None, dispatch: int | None = None):
    """(PassManager, PassReport): the passes in order, sharing one report.

    `quantize` = (bits, block size, symmetric): quantize the float linear sites first (QuantizePass).
    `dispatch` = ROWS: above ROWS token rows the fused sites run their prefill form (DispatchPass).
    """
    report = PassReport()
    locate = LocatePass(recipe, calibration, report)
    quantizer = QuantizePass(*quantize) if quantize else None
    passes = [PackPass(recipe, report)] if recipe.share_selection else []
    passes += [quantizer] if quantizer else []
    passes += [locate, InsertPass(locate)]
    if fuse:
        passes.append(FusePass(report))
    passes.append(RecordPass(locate, report))
    if dispatch is not None and fuse:
        passes.append(DispatchPass(locate, report, dispatch))
    digest = calibration.digest() if calibration is not None else None
    passes.append(FinishPass(recipe, digest, portable=portable, check=check,
                             quantized=quantizer.describe() if quantizer else None))
    return ir.passes.PassManager(passes), report


def run_pipeline(model: ir.Model, recipe, calibration=None, fuse: bool = True, portable: bool = False,
                 check: bool = True, quantize: tuple[int, int, bool] | None = None,
                 dispatch: int | None = None) -> PassReport:
    """Rewrite `model` in place; returns what was done per site."""
    manager, report = build_pipeline(recipe, calibration, fuse, portable, check, quantize, dispatch)
    try:
        manager(model)
    except ir.passes.PassError as e:  # PassManager wraps errors: surface a user error as itself
        cause = e
        while cause is not None and not isinstance(cause, NmOnnxError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
    if not fuse:
        for s in report.sites:
            if s["action"] == "sparse":
                report.fused[s["module"]] = "--no-fuse"
    return report
