"""CLI subcommands, one module each (see nm_onnx.cli for the protocol)."""
