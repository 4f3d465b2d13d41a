"""Load the tokenizer of a model or export directory, with one actionable error (no torch, no lm-eval)."""

from __future__ import annotations

from nm_onnx.errors import NmOnnxError


def load_tokenizer(source, option: str = "--tokenizer"):
    """A transformers tokenizer from `source` (a directory with tokenizer files, or a hub-style name)."""
    from transformers import AutoTokenizer

    import nm_onnx.models  # noqa: F401 - sets HF_HUB_OFFLINE before transformers is imported

    try:
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as e:  # noqa: BLE001 - many exception types for a missing/bad tokenizer
        raise NmOnnxError(
            f"no tokenizer at {source} ({type(e).__name__}); pass {option} DIR (a folder with tokenizer files, "
            "e.g. the export directory or the Hugging Face model directory)"
        ) from None
