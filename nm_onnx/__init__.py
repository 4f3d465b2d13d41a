"""nm-onnx: post-training N:M activation sparsity for ONNX language models."""
__version__ = "0.1.0"
