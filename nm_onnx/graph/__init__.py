"""onnx_ir helpers shared by inspect, calibration and the passes: loading, linear-site map."""

from nm_onnx.graph.load import load_model
from nm_onnx.graph.sites import KINDS, LinearSite, find_linear_sites, module_call

__all__ = ["KINDS", "LinearSite", "find_linear_sites", "load_model", "module_call"]
