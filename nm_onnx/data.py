"""Text data for evaluation and calibration, found offline first.

`--data wikitext2` means WikiText-2. Evaluation always uses the raw *test* split. Calibration uses the
raw *train* split where the Hugging Face hub/cache provides it, else the offline tokenized
*validation* split (`wikitext-2/valid.txt`); never the evaluation split. Sources are tried in order:
`$NM_ONNX_DATA`, the shared data folder beside the project (`../shared/data`), then `datasets`.
`--data FILE.txt` takes any local text file. Every loader returns (text, where-it-came-from) so that
reports can say which data they used.

Windows and the beginning-of-sequence token (docs/evaluation.md): a text is tokenized once without
special tokens and cut into windows; a model whose tokenizer adds a BOS token (`add_bos_token`, e.g.
the Gemma and Llama families) gets it at the start of every window, as lm-eval's hf model does:
the window is then [BOS] + seqlen - 1 text tokens (the same length), and every text token of it is
scored. `bos_id(tokenizer, "auto" | "always" | "never")` decides, in one place for every path
(evaluate, evaluate-torch, calibrate, validate, demo).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nm_onnx.errors import NmOnnxError

_PROJECT_ROOT = Path(__file__).resolve().parent.parent
WIKITEXT2 = ("wikitext2", "wikitext-2", "wikitext")


@dataclass(frozen=True)
class Text:
    text: str
    source: str  # human-readable: which split, which file


def data_dirs() -> list[Path]:
    """Candidate offline data folders, in priority order."""
    dirs = []
    if os.environ.get("NM_ONNX_DATA"):
        dirs.append(Path(os.environ["NM_ONNX_DATA"]))
    dirs.append(_PROJECT_ROOT.parent / "shared" / "data")
    dirs.append(Path.cwd().parent / "shared" / "data")
    return dirs


def find_data_file(relative: str) -> Path | None:
    for d in data_dirs():
        p = d / relative
        if p.is_file():
            return p
    return None


def _from_datasets(name: str, config: str, split: str) -> str | None:
    try:
        import datasets  # noqa: F401
        from datasets import load_dataset

        ds = load_dataset(name, config, split=split)
    except Exception:  # no hub, no cache, no package: the caller reports what was tried
        return None
    return "".join(ds["text"])


def _wikitext_join(raw: str) -> str:
    # The usual protocol: "\n\n".join(rows of the HF dataset); rows are the raw file's lines.
    return "\n\n".join(raw.splitlines(keepends=True))


BOS_CHOICES = ("auto", "always", "never")


def _local_file(data: str, option: str = "--data") -> Text:
    p = Path(data)
    if not p.exists():
        raise NmOnnxError(
            f"{option} '{data}' is neither 'wikitext2' nor an existing text file; "
            f"pass {option} wikitext2 or {option} PATH/TO/FILE.txt"
        )
    if p.is_dir():
        raise NmOnnxError(f"{option} '{data}' is a directory; pass a text file")
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        from nm_onnx.io import os_error

        raise os_error(e, p) from None
    if not text.strip():
        raise NmOnnxError(f"{option} file '{data}' is empty")
    return Text(text, f"file {p}")


def load_eval_text(data: str = "wikitext2", option: str = "--data") -> Text:
    """Evaluation text: WikiText-2 raw test split, or a local file."""
    if data.lower() in WIKITEXT2:
        p = find_data_file("wikitext-2-raw-v1/wiki.test.raw")
        if p is not None:
            return Text(_wikitext_join(p.read_text(encoding="utf-8")), f"WikiText-2 raw test ({p})")
        hub = _from_datasets("wikitext", "wikitext-2-raw-v1", "test")
        if hub is not None:
            return Text(hub, "WikiText-2 raw test (datasets)")
        raise NmOnnxError(
            "WikiText-2 raw test not found: set NM_ONNX_DATA to a folder holding "
            "wikitext-2-raw-v1/wiki.test.raw, or install `datasets` with hub access"
        )
    return _local_file(data, option)


def load_calibration_text(data: str = "wikitext2", option: str = "--data") -> Text:
    """Calibration text: WikiText-2 raw train (hub) else tokenized validation (offline), or a file."""
    if data.lower() in WIKITEXT2:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("1", "true", "True") or os.environ.get(
            "NM_ONNX_TRY_DATASETS"
        ):
            hub = _from_datasets("wikitext", "wikitext-2-raw-v1", "train")
            if hub is not None:
                return Text(hub, "WikiText-2 raw train (datasets)")
        p = find_data_file("wikitext-2/valid.txt")
        if p is not None:
            return Text(p.read_text(encoding="utf-8"), f"WikiText-2 tokenized validation ({p})")
        raise NmOnnxError(
            "no WikiText-2 calibration split found: set NM_ONNX_DATA to a folder holding "
            f"wikitext-2/valid.txt, or give {option} FILE.txt"
        )
    return _local_file(data, option)


def tokenize(tokenizer, text: str) -> np.ndarray:
    """Token ids of a whole text as int64 (no special tokens added: windows add the BOS, see bos_id)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def adds_bos(tokenizer) -> bool:
    """True when the tokenizer itself puts its BOS token in front of an encoded text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    probe = "Hello world"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    without = tokenizer(probe, add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos and with_special[1:1 + len(without)] == without


def bos_id(tokenizer, mode: str = "auto") -> int | None:
    """The token id that starts every window, or None: `auto` follows the tokenizer (adds_bos)."""
    if mode not in BOS_CHOICES:
        raise NmOnnxError(f"--bos must be one of {', '.join(BOS_CHOICES)}, got {mode!r}")
    if mode == "never":
        return None
    if mode == "always":
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise NmOnnxError("--bos always: the tokenizer has no BOS token; use --bos auto or never")
        return int(bos)
    return int(tokenizer.bos_token_id) if adds_bos(tokenizer) else None


def _with_bos(windows: np.ndarray, bos: int | None) -> np.ndarray:
    if bos is None:
        return windows
    return np.concatenate([np.full((windows.shape[0], 1), bos, dtype=np.int64), windows], axis=1)


def eval_windows(ids: np.ndarray, seqlen: int, limit: int | None = None, bos: int | None = None) -> np.ndarray:
    """Non-overlapping windows [n, seqlen] (the paper's protocol); the ragged tail is dropped.

    With `bos`, each window is [bos] + seqlen - 1 consecutive text tokens (so the model still sees
    `seqlen` tokens and every text token is predicted once).
    """
    if seqlen < 2:
        raise NmOnnxError(f"--seqlen must be at least 2, got {seqlen}")
    span = seqlen - (bos is not None)
    n = len(ids) // span
    if n == 0:
        raise NmOnnxError(f"text has {len(ids)} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        if limit < 1:
            raise NmOnnxError(f"--limit must be positive, got {limit}")
        n = min(n, limit)
    return _with_bos(ids[: n * span].reshape(n, span), bos)


def calibration_windows(ids: np.ndarray, samples: int, seqlen: int, seed: int = 0, bos: int | None = None) -> np.ndarray:
    """`samples` random windows [samples, seqlen] drawn with a fixed seed ([bos] + seqlen - 1 tokens with `bos`)."""
    span = seqlen - (bos is not None)
    if len(ids) <= span:
        raise NmOnnxError(
            f"calibration text has {len(ids)} tokens, too short for windows of {seqlen}; "
            "give more text or a smaller --seqlen"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - span, size=samples)
    return _with_bos(np.stack([ids[s : s + span] for s in starts]), bos)
