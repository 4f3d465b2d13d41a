"""Text data for evaluation and calibration, found offline first.

`--data wikitext2` means WikiText-2. Evaluation always uses the raw *test* split. Calibration uses the
raw *train* split where the Hugging Face hub/cache provides it, else the offline tokenized
*validation* split (`wikitext-2/valid.txt`); never the evaluation split. Sources are tried in order:
`$NM_ONNX_DATA`, the shared data folder beside the project (`../shared/data`), then `datasets`.
`--data FILE.txt` takes any local text file. Every loader returns (text, where-it-came-from) so that
reports can say which data they used.
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


def _local_file(data: str) -> Text:
    p = Path(data)
    if not p.exists():
        raise NmOnnxError(
            f"data '{data}' is neither 'wikitext2' nor an existing text file; "
            "pass --data wikitext2 or --data PATH/TO/FILE.txt"
        )
    if p.is_dir():
        raise NmOnnxError(f"data '{data}' is a directory; pass a text file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise NmOnnxError(f"data file '{data}' is empty")
    return Text(text, f"file {p}")


def load_eval_text(data: str = "wikitext2") -> Text:
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
    return _local_file(data)


def load_calibration_text(data: str = "wikitext2") -> Text:
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
            "wikitext-2/valid.txt, or give --data FILE.txt"
        )
    return _local_file(data)


def tokenize(tokenizer, text: str) -> np.ndarray:
    """Token ids of a whole text as int64 (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def eval_windows(ids: np.ndarray, seqlen: int, limit: int | None = None) -> np.ndarray:
    """Non-overlapping windows [n, seqlen] (the paper's protocol); the ragged tail is dropped."""
    if seqlen < 2:
        raise NmOnnxError(f"--seqlen must be at least 2, got {seqlen}")
    n = len(ids) // seqlen
    if n == 0:
        raise NmOnnxError(f"text has {len(ids)} tokens, fewer than one window of {seqlen}")
    if limit is not None:
        if limit < 1:
            raise NmOnnxError(f"--limit must be positive, got {limit}")
        n = min(n, limit)
    return ids[: n * seqlen].reshape(n, seqlen)


def calibration_windows(ids: np.ndarray, samples: int, seqlen: int, seed: int = 0) -> np.ndarray:
    """`samples` random windows [samples, seqlen] drawn with a fixed seed."""
    if len(ids) <= seqlen:
        raise NmOnnxError(
            f"calibration text has {len(ids)} tokens, too short for windows of {seqlen}; "
            "give more text or a smaller --seqlen"
        )
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - seqlen, size=samples)
    return np.stack([ids[s : s + seqlen] for s in starts])
