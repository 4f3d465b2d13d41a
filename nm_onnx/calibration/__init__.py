"""Calibration: statistics and layer-wise fitting that produce a `CalibrationArtifact`.

  calibrate(model, recipe, windows, out, ...) -> CalibrationArtifact   (nm_onnx.calibration.layerwise)
  load_artifact(dir) -> CalibrationArtifact  (.recipe, .constants(module), .digest(), .modules())
"""

from nm_onnx.calibration.artifact import CalibrationArtifact, load_artifact
from nm_onnx.calibration.layerwise import calibrate, capture_layer_inputs, fit_layer, layer_mse, run_layer

__all__ = ["CalibrationArtifact", "calibrate", "capture_layer_inputs", "fit_layer", "layer_mse", "load_artifact", "run_layer"]
