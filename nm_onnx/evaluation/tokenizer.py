"""Load the tokenizer of a model or export directory, with one actionable error (no torch, no lm-eval).

ORT GenAI's model builder runs transformers 5, which saves `tokenizer_class: TokenizersBackend` (its
name for a plain tokenizer.json tokenizer) that transformers 4.57 cannot resolve; such a folder is read
with `PreTrainedTokenizerFast`, the same tokenizer.json tokenizer (ids checked equal on SmolLM2).
"""

from __future__ import annotations

import json
from pathlib import Path

from nm_onnx.errors import NmOnnxError

_TRANSFORMERS5_BACKEND = "TokenizersBackend"


def _transformers5_backend(source) -> bool:
    try:
        cfg = json.loads((Path(str(source)) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and cfg.get("tokenizer_class") == _TRANSFORMERS5_BACKEND


def load_tokenizer(source, option: str = "--tokenizer"):
    """A transformers tokenizer from `source` (a directory with tokenizer files, or a hub-style name)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging

    import nm_onnx.models  # noqa: F401 - sets HF_HUB_OFFLINE before transformers is imported

    try:
        if _transformers5_backend(source) and (Path(str(source)) / "tokenizer.json").is_file():
            verbosity = logging.get_verbosity()
            logging.set_verbosity_error()  # "not the same type as the class": intended here
            try:
                return PreTrainedTokenizerFast.from_pretrained(str(source))
            finally:
                logging.set_verbosity(verbosity)
        return AutoTokenizer.from_pretrained(str(source))
    except Exception as e:  # noqa: BLE001 - many exception types for a missing/bad tokenizer
        raise NmOnnxError(
            f"no tokenizer at {source} ({type(e).__name__}); pass {option} DIR (a folder with tokenizer files, "
            "e.g. the export directory or the Hugging Face model directory)"
        ) from None
