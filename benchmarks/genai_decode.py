"""Decode (and prefill) speed of ORT GenAI directories through og.Generator: sparse vs dense, interleaved.

Each model is loaded once (`og.Model`, with `intra_op_num_threads` set through `og.Config.overlay`);
each repeat runs every model in turn on the same prompt (the first --prompt tokens of WikiText-2 raw
test, tokenized by the dense directory's tokenizer files): one `append_tokens` call (prefill, timed)
then --decode `generate_next_token` steps (timed together). Speedups are medians over the repeats of
the back-to-back ratio dense time / model time, so a load change on a shared machine hits both sides
of a pair alike. The order rotates per repeat, so with three or more models every one runs in every
position equally often (a forward/backward alternation kept the middle model in the middle).

    .venv/bin/python benchmarks/genai_decode.py runs/g runs/g-8x16 [more sparse dirs] --prompt 128 --decode 32

`--separate`: models too large to hold together (a 1.7B float32 model and its --prefill-dispatch copy:
6.8 + 13.6 GB) are loaded one at a time, each repeat a fresh process per model (warm-up run, then the
timed run), the processes alternating between the models as the in-process repeats alternate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np


def load(directory: str, threads: int):
    import onnxruntime_genai as og

    cfg = og.Config(directory)
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    return og.Model(cfg)


def run_once(model, prompt: np.ndarray, decode: int, max_length: int = 0) -> tuple[float, float]:
    """(prefill seconds, decode seconds for `decode` tokens) of one greedy generation; og allocates the
    KV cache for `max_length` tokens (0: just the prompt and the decoded tokens)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    length = max(max_length, prompt.shape[1] + decode + 1)
    params.set_search_options(max_length=length, min_length=prompt.shape[1] + decode + 1, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)  # prefill; produces the logits of the first new token
    t1 = time.perf_counter()
    for _ in range(decode):
        gen.generate_next_token()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def prompt_ids(directory: str, tokens: int) -> np.ndarray:
    from nm_onnx.data import load_eval_text, tokenize
    from nm_onnx.evaluation.tokenizer import load_tokenizer

    ids = tokenize(load_tokenizer(directory), load_eval_text("wikitext2").text[:20 * tokens])
    if len(ids) < tokens:
        raise SystemExit(f"only {len(ids)} prompt tokens available")
    return np.asarray(ids[:tokens], dtype=np.int32)[None, :]


def _child(args, directory: str) -> tuple[float, float]:
    import subprocess

    cmd = [sys.executable, __file__, args.dense, directory, "--child", "--prompt", str(args.prompt),
           "--decode", str(args.decode), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--max-length", str(args.max_length)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return tuple(json.loads(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dense", help="dense GenAI directory (the baseline)")
    ap.add_argument("models", nargs="+", help="GenAI directories to compare with it (e.g. transformed ones)")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    ap.add_argument("--decode", type=int, default=32, help="decode steps timed per repeat (0: prefill only)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--separate", action="store_true", help="one fresh process per model and repeat")
    ap.add_argument("--max-length", type=int, default=0,
                    help="og's max_length (the KV buffer it allocates; default prompt + decode + 1)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # --separate's worker
    args = ap.parse_args(argv)

    names = [args.dense, *args.models]
    prompt = prompt_ids(args.dense, args.prompt)
    if args.child:  # load models[0] alone, warm up, print one timed (prefill, decode) as JSON
        model = load(args.models[0], args.threads)
        for _ in range(args.warmup):
            run_once(model, prompt, min(args.decode, 4))
        print(json.dumps(run_once(model, prompt, args.decode, args.max_length)))
        return 0
    models = {} if args.separate else {d: load(d, args.threads) for d in names}
    for _ in range(0 if args.separate else args.warmup):
        for d in names:
            run_once(models[d], prompt, min(args.decode, 4))
    times: dict[str, list[tuple[float, float]]] = {d: [] for d in names}
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]  # every model takes every position
        for d in order:
            times[d].append(_child(args, d) if args.separate else run_once(models[d], prompt, args.decode,
                                                                            args.max_length))
        print(f"repeat {rep + 1}/{args.repeats}", file=sys.stderr)
    rows = []
    base = times[args.dense]
    for d in names:
        pre = [t[0] for t in times[d]]
        dec = [t[1] for t in times[d]]
        rows.append({
            "model": d,
            "prefill_ms": 1e3 * statistics.median(pre),
            "decode_tok_s": args.decode / statistics.median(dec) if args.decode else None,
            "prefill_speedup": statistics.median(b[0] / t[0] for b, t in zip(base, times[d])),
            "decode_speedup": statistics.median(b[1] / t[1] for b, t in zip(base, times[d])) if args.decode else None,
        })
    print(f"og.Generator, prompt {args.prompt}, {args.decode} decode steps"
          f"{f', max_length {args.max_length}' if args.max_length else ''}, {args.repeats} interleaved repeats"
          f"{' (a fresh process per model and repeat)' if args.separate else ''}, {args.threads} threads\n")
    print("| model | prefill ms | decode tok/s | prefill speedup | decode speedup |\n|---|---|---|---|---|")
    for r in rows:
        tok_s = "–" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}"
        speedup = "–" if r["decode_speedup"] is None else f"{r['decode_speedup']:.2f}x"
        print(f"| {r['model']} | {r['prefill_ms']:.1f} | {tok_s} | {r['prefill_speedup']:.2f}x | {speedup} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
