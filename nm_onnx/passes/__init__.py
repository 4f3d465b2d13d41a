"""Graph passes of `nm-onnx transform`, one per file, composed by `pipeline.py` (onnx_ir PassManager).

  locate  (locate.py)  recipe target globs -> linear sites, with every precondition checked
  insert  (insert.py)  unfused activation sparsity: TokenShift/Sub -> NMMask -> MatMul -> bias terms
  fuse    (fuse.py)    unfused chain -> one NMSparseMatMul (pattern / check / rewrite, reasons on failure)
  record  (record.py)  the identity of every sparsified site (input, output, nodes) -> model metadata
  finish  (finish.py)  opset imports, --portable functions, metadata, checker, shape inference
"""

from nm_onnx.passes.pipeline import PassReport, SitePlan, run_pipeline

__all__ = ["PassReport", "SitePlan", "run_pipeline"]
