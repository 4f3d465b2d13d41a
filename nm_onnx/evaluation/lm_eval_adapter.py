"""lm-eval-harness model type `nm-onnx`: zero-shot tasks through our ONNX Runtime sessions.

Importing this module registers the model type with lm-eval's registry (lm-eval finds models only
there), so any entry point that imports it can use `--model nm-onnx --model_args path=MODEL`:
`python -m nm_onnx.evaluation.lm_eval_cli ...` (lm-eval's own CLI + this import + the offline tasks),
`nm-onnx evaluate MODEL --tasks arc_easy,piqa`, or `lm_eval.simple_evaluate(model="nm-onnx", ...)`
after `import nm_onnx.evaluation.lm_eval_adapter`.

Batching (model arg `batch_size`, default 1): requests that share their context (a multiple-choice
question's choices) and have a KV cache to share it on are scored on one prefix per context, several
contexts of the same length a call (so no row's past needs padding: padding would move its keys
along the attention axis and change the softmax's summation order, a rounding change that sparse
masks can amplify into flips). Up to batch_size questions' contexts, each minus its last token, run
in one call, and each context's KV cache is its row. Then calls of up to batch_size rows [last
context token, continuation minus its last token] (rows of several questions, right-padded) run on
those caches, position_ids continuing the context. Each row then attends to exactly the tokens it
would see in its own full forward, at the same positions, so its logits are those of batch 1 (to
float rounding: max 8.9e-6 over the 9501 arc_easy requests on SmolLM2 8:16, benchmarks/RESULTS.md);
at batch 16, 16 four-choice ARC questions of one context length take 5 calls instead of 64. The
other requests (1-token contexts, contexts seen once, requests cut on the left to max_length,
models without KV cache, and ORT GenAI graphs, whose GroupQueryAttention takes a past with several
new tokens only at batch 1) are sorted by length (longest first, as lm-eval's hf model does), cut
into batches and right-padded with an all-ones attention mask, so again causal attention keeps every
real token from seeing the pads behind it (lm-eval's hf model passes no mask either). The per-token masks of
the magnitude, Amber and Wanda criteria depend on the token's own row only, so a sparse model of
those gives the same log-likelihoods batched or on a shared prefix (tests/test_lm_eval_batch.py:
within 1e-4, same accuracies). A clact site ranks by column norms over *all* tokens of the call
(pads, other rows, and a split prefix change them), so a model with any criterion outside those
three (read from the site records in the model's metadata) is scored at batch 1, and the adapter
says so on stderr. Rolling windows and generation stay at batch 1.
Model args: path (an .onnx file or export directory), tokenizer (default: the model's directory),
threads, max_length (default: max_position_embeddings of the directory's config.json, else 2048),
bos (auto | always | never; lm-eval's `add_bos_token=True/False` is accepted too), batch_size.

Tokenization follows lm-eval's own `hf` model exactly (so log-likelihoods match it): with bos=auto a
request is encoded with the tokenizer's default special tokens (the BOS of Gemma / Llama
tokenizers), except when the text already starts with the BOS string; the prefix token of an empty
context and of rolling windows is the BOS (else EOS) token.
"""

from __future__ import annotations  # noqa: I001 - nm_onnx.models must be imported before lm_eval

import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np

import nm_onnx.models  # noqa: F401 - sets HF_HUB_OFFLINE etc. before lm-eval imports `datasets`
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from nm_onnx.errors import NmOnnxError
from nm_onnx.evaluation.feeds import has_kv_cache, is_genai, make_feed, present_names, present_to_past
from nm_onnx.evaluation.tokenizer import load_tokenizer
from nm_onnx.progress import progress
from nm_onnx.scoring import log_softmax


@register_model("nm-onnx", "nm_onnx")
class NmOnnxLM(TemplateLM):
    """An lm-eval LM over an (optionally N:M-sparse) ONNX causal LM run by ONNX Runtime."""

    def __init__(self, path=None, tokenizer=None, threads=None, max_length=None, session=None, bos="auto",
                 add_bos_token=None, batch_size=1, **_ignored):
        super().__init__()
        from nm_onnx.data import BOS_CHOICES
        from nm_onnx.runtime import make_session, session_dir

        if add_bos_token is not None:  # lm-eval's hf model argument
            bos = "always" if str(add_bos_token).lower() in ("1", "true", "yes") else "never"
        if bos not in BOS_CHOICES:
            raise NmOnnxError(f"model arg bos={bos!r}: use one of {', '.join(BOS_CHOICES)}")
        self.bos = bos

        if session is None:
            if path is None:
                raise NmOnnxError("model type nm-onnx needs --model_args path=MODEL.onnx (or an export dir)")
            session = make_session(path, threads=int(threads) if threads else None)
            tok_src = tokenizer or session_dir(path)
        else:
            tok_src = tokenizer
        self.session = session
        self.tokenizer = (load_tokenizer(tok_src, option="tokenizer=DIR (model arg)")
                          if isinstance(tok_src, (str, Path)) else tok_src)
        self._outputs = [o.name for o in session.get_outputs()]
        if "logits" not in self._outputs:
            raise NmOnnxError("the ONNX model has no 'logits' output; export a causal LM with `nm-onnx export`")
        self._max_length = int(max_length) if max_length else _config_max_length(path)
        self.batch_size = _batch_size(batch_size)
        self.batch_blocker = batch_dependent_criteria(session)
        if self.batch_size > 1 and self.batch_blocker:
            print(f"nm-onnx: the model's {'/'.join(self.batch_blocker)} sites rank by statistics over every "
                  f"token of a call, so padding and other rows would change its masks: scoring at batch 1 "
                  f"(batch_size={self.batch_size} ignored)", file=sys.stderr)
            self.batch_size = 1

    # ---------------------------------------------------------------- basics
    @property
    def eot_token_id(self) -> int:
        t = self.tokenizer
        return t.eos_token_id if t.eos_token_id is not None else 0

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def prefix_token_id(self) -> int:
        t = self.tokenizer
        return t.bos_token_id if t.bos_token_id is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        """lm-eval hf's tok_encode: the tokenizer's default special tokens unless told (see module doc)."""
        t = self.tokenizer
        if add_special_tokens is None and self.bos == "auto":
            bos_text = t.decode(self.prefix_token_id)
            starts = bool(bos_text) and string.startswith(bos_text)
            return t.encode(string, **({"add_special_tokens": False} if starts else {}))
        if add_special_tokens is None:
            add_special_tokens = self.bos == "always"
        ids = t.encode(string, add_special_tokens=False)
        if add_special_tokens and t.bos_token_id is not None and (not ids or ids[0] != t.bos_token_id):
            ids = [t.bos_token_id, *ids]
        return ids

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _logprobs(self, ids: list[int]) -> np.ndarray:
        """Log-softmax [T, V] (float64) of one forward over `ids`."""
        arr = np.asarray(ids, dtype=np.int64)[None, :]
        logits = self.session.run(["logits"], make_feed(self.session, arr))[0][0]
        return log_softmax(logits)

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each (context, continuation) pair, in one right-padded forward."""
        rows = []
        for context, continuation in pairs:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[-len(continuation):]))
        width = max(len(inp) for inp, _ in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)  # pad id 0 behind each row, as lm-eval's hf model
        for r, (inp, _) in enumerate(rows):
            ids[r, :len(inp)] = inp
        logits = self.session.run(["logits"], make_feed(self.session, ids))[0]
        # the continuation's positions only
        return [_score_row(logits[r, len(inp) - len(tgt):len(inp)], tgt) for r, (inp, tgt) in enumerate(rows)]

    def _score_groups(self, requests, groups: list[list[int]]) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of the requests of <= batch_size shared-context groups, in group order.

        The groups' contexts all have one length (the caller forms them so): one call runs their
        prefixes (`_prefix_caches`), then calls of <= batch_size rows (`_score_rows`, a group's rows
        may span several calls) score the continuations on those caches."""
        contexts = [list(requests[g[0]][1]) for g in groups]
        if len({len(c) for c in contexts}) != 1:
            raise ValueError("shared-context groups of one call must have one context length")
        caches = self._prefix_caches(contexts)
        rows = [(cache, context, list(requests[i][2]))
                for g, context, cache in zip(groups, contexts, caches) for i in g]
        bs = self.batch_size
        return [res for s in range(0, len(rows), bs) for res in self._score_rows(rows[s:s + bs])]

    def _prefix_caches(self, contexts: list[list[int]]) -> list[dict]:
        """KV cache of each context minus its last token ({past input name: its row}), from one call
        over the (equally long) prefixes."""
        sess = self.session
        ids = np.asarray([c[:-1] for c in contexts], dtype=np.int64)
        names = present_names(sess)  # not the logits [G, width, V]
        past = present_to_past(sess, sess.run(names, make_feed(sess, ids)), names)
        return [{name: v[g:g + 1] for name, v in past.items()} for g in range(len(contexts))]

    def _score_rows(self, rows: list[tuple[dict, list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each (cache, context, continuation) row, in one call.

        A row's tokens [context[-1], *continuation[:-1]] are right-padded with id 0 to the widest row
        (causal attention hides the pads behind the real tokens) on its context's cache; every row's
        past has the same length, so the rows' keys sit at the positions of their own full forward and
        a row's logits at 0..len(continuation)-1 are those of batch 1."""
        sess = self.session
        past_len = len(rows[0][1]) - 1
        ids = np.zeros((len(rows), max(len(cont) for _, _, cont in rows)), dtype=np.int64)
        for r, (_, context, cont) in enumerate(rows):
            ids[r, :len(cont)] = [context[-1], *cont[:-1]]
        past = {name: np.concatenate([cache[name] for cache, _, _ in rows], axis=0) for name in rows[0][0]}
        logits = sess.run(["logits"], make_feed(sess, ids, past, past_len))[0]
        return [_score_row(logits[r, :len(cont)], cont) for r, (_, _, cont) in enumerate(rows)]

    def _shared_contexts(self, requests) -> tuple[list[list[int]], list[int]]:
        """Indices of the requests to score on a shared context (one list per context), and the rest.

        A context is shared when batching is on, the model has a KV cache, >= 2 requests have it, it
        has >= 2 tokens (one to cache, one to start the rows) and none of its requests is cut on the
        left to max_length (the cut would change the context). Not on ORT GenAI graphs: their
        GroupQueryAttention takes several new tokens on a past only at batch 1."""
        if self.batch_size == 1 or not has_kv_cache(self.session) or is_genai(self.session):
            return [], list(range(len(requests)))
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, _) in enumerate(requests):
            by_context.setdefault(tuple(context), []).append(i)
        shared, rest = [], []
        for context, idx in by_context.items():
            fits = all(0 < len(requests[i][2]) <= self.max_length + 1 - len(context) for i in idx)
            if len(idx) > 1 and len(context) > 1 and fits:
                shared.append(idx)
            else:
                rest += idx
        return shared, rest

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        return self._score_batch([(context, continuation)])[0]

    # ---------------------------------------------------------------- lm-eval API
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        requests = list(requests)
        shared, rest = self._shared_contexts(requests)
        # longest first (lm-eval hf's order): a batch's first row sets its width, padding stays small
        rest.sort(key=lambda i: (-len(requests[i][1]) - len(requests[i][2]), tuple(requests[i][1] + requests[i][2])))
        # shared contexts by length, so that groupby cuts them into runs of one context length: one call's
        # questions share it (no padded pasts; module docstring, benchmarks/RESULTS.md)
        shared.sort(key=lambda g: (-len(requests[g[0]][1]), tuple(requests[g[0]][1])))
        bs = self.batch_size
        same_length = [list(g) for _, g in itertools.groupby(shared, key=lambda g: len(requests[g[0]][1]))]
        units = ([(True, same[i:i + bs]) for same in same_length for i in range(0, len(same), bs)]
                 + [(False, rest[i:i + bs]) for i in range(0, len(rest), bs)])
        out: list = [None] * len(requests)
        desc = "loglikelihood (ORT)" + (f", batch {bs}" if bs > 1 else "") + (", shared contexts" if shared else "")
        bar = progress(units, desc, not disable_tqdm, unit="batch")
        for is_shared, unit in bar:
            if is_shared:
                idx = [i for g in unit for i in g]
                scores = self._score_groups(requests, unit)
            else:
                idx = unit
                scores = self._score_batch([(list(requests[i][1]), list(requests[i][2])) for i in idx])
            for i, res in zip(idx, scores):
                if self.cache_hook is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
                out[i] = res
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in progress(requests, "rolling loglikelihood (ORT)", not disable_tqdm):
            (text,) = req.args
            windows = get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, 1
            )
            total = 0.0
            for ctx, pred in map(make_disjoint_window, windows):
                total += self._score(list(ctx), list(pred))[0]
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in progress(requests, "generate (ORT)", not disable_tqdm):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-self.max_length:] or [self.prefix_token_id]
            text = self.generate_greedy(ids, max_new, until)
            out.append(text)
        return out

    def generate_greedy(self, ids: list[int], max_new: int, until: list[str] = ()) -> str:
        """Greedy decoding (KV cache when the model has one), stopped at EOS or any `until` string."""
        sess = self.session
        new: list[int] = []
        kv = has_kv_cache(sess)
        feed_ids, past, past_len = list(ids), None, 0
        for _ in range(max_new):
            if kv:
                res = sess.run(None, make_feed(sess, np.asarray(feed_ids)[None, :], past, past_len))
                logits = res[self._outputs.index("logits")]
                past, past_len = present_to_past(sess, res), past_len + len(feed_ids)
            else:
                all_ids = (ids + new)[-self.max_length:]
                logits = sess.run(["logits"], make_feed(sess, np.asarray(all_ids)[None, :]))[0]
            nxt = int(np.argmax(logits[0, -1]))
            if nxt == self.eot_token_id:
                break
            new.append(nxt)
            feed_ids = [nxt]
            text = self.tok_decode(new)
            if any(u in text for u in until):
                return text[: min(text.index(u) for u in until if u in text)]
            if past_len + 1 > self.max_length:
                break
        return self.tok_decode(new)


def _score_row(logits: np.ndarray, targets: list[int]) -> tuple[float, bool]:
    """(sum of log-probs, every token greedy) of `targets` under the logits [n, V] that predict them."""
    lp = log_softmax(logits)
    tgt = np.asarray(targets)
    return float(lp[np.arange(len(tgt)), tgt].sum()), bool((lp.argmax(-1) == tgt).all())


def _batch_size(value) -> int:
    """The model arg batch_size (lm-eval passes ints or strings; 'auto' is not supported)."""
    try:
        v = int(value if value is not None else 1)
    except (TypeError, ValueError):
        raise NmOnnxError(f"model arg batch_size={value!r}: give a positive integer (e.g. batch_size=16)") from None
    if v < 1:
        raise NmOnnxError(f"model arg batch_size={v}: give a positive integer (e.g. batch_size=16)")
    return v


BATCH_SAFE_CRITERIA = ("magnitude", "amber", "wanda")  # a token's mask depends on its own row only


def batch_dependent_criteria(session) -> list[str]:
    """Criteria of the model's sparse sites whose masks depend on the whole call (e.g. clact); [] if none."""
    from nm_onnx.passes.record import SITES_KEY

    raw = session.get_modelmeta().custom_metadata_map.get(SITES_KEY)
    try:
        records = json.loads(raw) if raw else []
    except ValueError:
        return ["unknown (unreadable site records)"]
    found = {str(r.get("criterion", "magnitude")) for r in records if isinstance(r, dict)}
    return sorted(found - set(BATCH_SAFE_CRITERIA))


def _config_max_length(path) -> int:
    if path is not None:
        p = Path(path)
        cfg = (p if p.is_dir() else p.parent) / "config.json"
        if cfg.is_file():
            try:
                v = json.loads(cfg.read_text()).get("max_position_embeddings")
                if isinstance(v, int) and v > 1:
                    return min(v, 4096)
            except (ValueError, OSError):
                pass
    return 2048


def evaluate_tasks(model_path, tasks, limit=None, threads=None, tokenizer=None, session=None, bos="auto",
                   batch_size=1) -> dict:
    """Zero-shot accuracy of MODEL on offline tasks: {task: {metric: value}} (lm-eval, 0-shot)."""
    import lm_eval

    from nm_onnx.evaluation.tasks import parse_tasks, task_manager

    names = parse_tasks(tasks)
    lm = NmOnnxLM(path=model_path, tokenizer=tokenizer, threads=threads, session=session, bos=bos,
                  batch_size=batch_size)
    res = lm_eval.simple_evaluate(
        model=lm, tasks=names, num_fewshot=0, limit=limit, task_manager=task_manager(names),
        bootstrap_iters=0, log_samples=False,
    )
    out = {}
    for name in names:
        metrics = res["results"].get(name, {})
        out[name] = {
            k.split(",")[0]: float(v)
            for k, v in metrics.items()
            if k.split(",")[0] in ("acc", "acc_norm") and isinstance(v, (int, float)) and not math.isnan(float(v))
        }
        out[name]["samples"] = int(res.get("n-samples", {}).get(name, {}).get("effective", 0))
    return out
