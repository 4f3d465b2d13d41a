"""Calibration: statistics and layer-wise fitting that produce a `CalibrationArtifact`.

  calibrate(model, recipe, windows, out, ...) -> CalibrationArtifact   (nm_onnx.calibration.layerwise, torch)
  load_artifact(dir) -> CalibrationArtifact  (.recipe, .constants(module), .digest(), .modules())  (torch-free)

The artifact side is torch-free (transform reads artifacts); the fitting side is imported on first
use, so `from nm_onnx.calibration import load_artifact` never loads torch.
"""

from nm_onnx.calibration.artifact import CalibrationArtifact, load_artifact

_LAYERWISE = ("calibrate", "capture_layer_inputs", "fit_layer", "layer_mse", "run_layer")

__all__ = ["CalibrationArtifact", "calibrate", "capture_layer_inputs", "fit_layer", "layer_mse", "load_artifact",
           "run_layer"]


def __getattr__(name):
    if name in _LAYERWISE:
        from nm_onnx.calibration import layerwise

        return getattr(layerwise, name)
    raise AttributeError(f"module 'nm_onnx.calibration' has no attribute {name!r}")
