"""`nm-onnx autotune`: the allocation on synthetic tables (budget respected, optimal against brute
force), the recipe it writes, argument errors (one line, exit 2, before any work), and one real run on
a small random model (real ORT sessions and op library) whose recipe.json transforms and validates."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
from conftest import error_lines, needs_library
from models_cache import tiny_export, tiny_hf, wide_export

from nm_onnx.autotune.allocate import Option, allocate, to_recipe
from nm_onnx.autotune.spec import group_name, parse_budget, parse_candidates, site_groups
from nm_onnx.cli import main
from nm_onnx.errors import NmOnnxError
from nm_onnx.recipe import SparsityRecipe


def _table(rng, groups=6, patterns=("12:16", "8:16", "6:16")):
    out = {}
    for g in range(groups):
        cost, saved, opts = 0.0, 0.0, []
        for p in patterns:  # sparser: costs more, usually saves more (not always: measured times are noisy)
            cost += rng.uniform(0.0, 0.05)
            saved += rng.uniform(-0.01, 0.1)
            opts.append(Option(p, cost if rng.random() > 0.1 else -0.001, saved))
        out[f"g{g}"] = opts
    return out


def _brute(options, budget):
    names = list(options)
    best = 0.0
    for combo in itertools.product(*[[None, *options[g]] for g in names]):
        picked = [o for o in combo if o is not None]
        if sum(max(o.cost, 0) for o in picked) <= budget + 1e-12:
            best = max(best, sum(o.saved for o in picked))
    return best


@pytest.mark.parametrize("seed", range(12))
def test_allocation_respects_the_budget_and_is_optimal(seed):
    rng = random.Random(seed)
    options = _table(rng)
    budget = rng.uniform(0.02, 0.2)
    a = allocate(options, budget, resolution=4000)
    assert a.cost <= budget + 1e-12
    assert sum(max(o.cost, 0) for g in options for o in options[g] if o.pattern == a.choice[g]) == pytest.approx(a.cost)
    opt = _brute(options, budget)
    # exact up to the rounding of costs to budget/resolution units (documented)
    relaxed = _brute(options, budget * (1 - len(options) / 4000))
    assert relaxed - 1e-9 <= a.saved <= opt + 1e-9


def test_allocation_never_picks_an_option_that_saves_no_time():
    options = {"a": [Option("8:16", 0.0, -0.1), Option("6:16", 0.0, 0.0)], "b": [Option("8:16", 0.01, 0.5)]}
    a = allocate(options, 0.05)
    assert a.choice == {"a": "dense", "b": "8:16"} and a.saved == 0.5
    assert allocate(options, 0.005).choice == {"a": "dense", "b": "dense"}


def test_budget_in_nats_and_parsing():
    assert parse_budget("5%").relative == pytest.approx(0.05)
    assert parse_budget("+25%").nll == pytest.approx(math.log(1.25))
    assert parse_budget("0.1").relative == pytest.approx(0.1)
    for bad, fragment in [("-5%", "positive"), ("0", "positive"), ("20", "more than 1000%"), ("5 %%", "not a number"),
                          ("abc", "not a number"), ("nan", "positive")]:
        with pytest.raises(NmOnnxError, match=fragment):
            parse_budget(bad)
    assert parse_candidates("8:16, 12:16,8:16") == ["dense", "8:16", "12:16"]
    for bad, fragment in [("8:16,3:2", "unknown candidate '3:2'"), ("dense", "no N:M pattern"),
                          ("unstructured:0.5", "not an N:M pattern"), ("foo", "unknown candidate 'foo'")]:
        with pytest.raises(NmOnnxError, match=fragment):
            parse_candidates(bad)


def test_groups_and_the_recipe_they_give():
    mods = [f"model.layers.{i}.{m}" for i in range(2) for m in
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")]
    groups = site_groups(mods)
    assert list(groups)[:4] == ["model.layers.0.attn_in", "model.layers.0.attn_out", "model.layers.0.mlp_in",
                                "model.layers.0.mlp_out"]
    assert groups["model.layers.1.attn_in"] == mods[7:10] and group_name("lm_head") == "lm_head"
    choice = {g: "dense" for g in groups}
    choice.update({"model.layers.0.mlp_in": "8:16", "model.layers.1.mlp_in": "8:16", "model.layers.1.attn_out": "12:16"})
    r = to_recipe(choice, groups, SparsityRecipe.load("8:16-variance"), "t")
    settings = SparsityRecipe.from_json(r.to_json()).resolve(mods, {m: 64 for m in mods})
    assert {m: s.pattern for m, s in settings.items()} == {m: next(p for g, p in choice.items() if m in groups[g])
                                                           for m in mods}
    assert all(s.variance_correction for s in settings.values())
    shared = to_recipe(choice, groups, SparsityRecipe.load("8:16-magnitude+shared"), "t")  # groups = selection groups
    assert shared.share_selection and shared.selection_groups(shared.resolve(mods))
    assert to_recipe({g: "dense" for g in groups}, groups, SparsityRecipe(), "t") is None


@needs_library
@pytest.mark.parametrize("args, fragment", [
    (["--budget=-5%"], "must be a positive perplexity increase"),
    (["--budget", "2000%"], "more than 1000%"),
    (["--budget", "five"], "is not a number"),
    (["--budget", "5%", "--candidates", "dense,7:7"], "unknown candidate '7:7'"),
    (["--budget", "5%", "--candidates", "dense,3:48"], "pattern 3:48 does not divide K=64 at site 'model.layers.0"),
    (["--budget", "5%", "--base-recipe", "8:16-static-shift"], "needs calibration constants"),
    (["--budget", "5%", "--base-recipe", "nope"], "unknown recipe 'nope'"),
])
def test_argument_errors_are_one_line_exit_2_before_any_work(tmp_path, capsys, args, fragment):
    out = tmp_path / "out"
    hf, exp = tiny_hf("llama"), tiny_export("llama")  # built (and their progress printed) before the capture
    capsys.readouterr()
    rc = main(["autotune", str(hf), "--export", str(exp), "--out", str(out), *args])
    err = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1 and fragment in err[0], err
    assert not out.exists() and not (tmp_path / ".out.autotune-state").exists()


@needs_library
def test_output_rules_are_those_of_every_command(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    rc = main(["autotune", str(tiny_hf("llama")), "--export", str(tiny_export("llama")), "--out", str(out),
               "--budget", "5%"])
    err = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1 and "holds files nm-onnx did not write" in err[0]
    assert (out / "mine.txt").read_text() == "user data"
    rc = main(["autotune", str(tiny_hf("llama")), "--export", str(tiny_export("llama")),
               "--out", str(tiny_export("llama") / "x"), "--budget", "5%"])
    assert rc == 2 and "lies inside the input" in capsys.readouterr().err


@needs_library
def test_a_work_dir_of_the_users_is_refused_and_kept(tmp_path, capsys):
    hf, exp = tiny_hf("llama"), tiny_export("llama")
    work = tmp_path / "mine"
    (work / "verify-model").mkdir(parents=True)  # a name autotune would clear inside its own work dir
    (work / "verify-model" / "notes.txt").write_text("user data")
    capsys.readouterr()
    rc = main(["autotune", str(hf), "--export", str(exp), "--out", str(tmp_path / "out"), "--budget", "5%",
               "--work-dir", str(work)])
    err = error_lines(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1 and "--work-dir directory" in err[0] and "did not write" in err[0], err
    assert (work / "verify-model" / "notes.txt").read_text() == "user data"
    assert not (tmp_path / "out").exists()


@needs_library
@pytest.mark.slow
def test_autotune_end_to_end_recipe_transforms_and_validates(tmp_path, capsys):
    """A real run (small wide random Llama, so the sparse op saves time): outputs, budget verdict, the
    recipe through transform and validate (b), and a resumed run that measures nothing again."""
    from nm_onnx.transform import transform
    from nm_onnx.validate import main as validate_main

    export = wide_export()
    hf = export.parent / "wide-llama-hf"
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["autotune", str(hf), "--export", str(export), "--budget", "50%", "--out", str(out), "--work-dir", str(work),
            "--samples", "2", "--seqlen", "32", "--check", "3", "--limit", "1", "--eval-seqlen", "32",
            "--prompt", "8", "--decode", "4", "--repeats", "1", "--speed-repeats", "20", "--uniform", "8:16", "--quiet"]
    rc = main(argv)
    cap = capsys.readouterr()
    assert rc in (0, 1), cap.err[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["within_budget"] == (rc == 0) == (report["verified"]["delta_nll"] <= math.log(1.5))
    assert {"recipe.json", "report.md", "frontier.csv", "sensitivity.json", "speed.json"} <= {p.name for p in out.iterdir()}
    assert report["sensitivity"]["check"]["pairs"] == 3 and len(report["groups"]) == 8
    assert report["rounds"][0]["predicted_nll"] <= math.log(1.5) + 1e-12
    assert "autotune: sensitivity" in cap.err and "round 0" in cap.err
    recipe = SparsityRecipe.load(out / "recipe.json")
    transform(export, tmp_path / "sparse", out / "recipe.json")
    rc = validate_main([str(export), str(tmp_path / "sparse"), "--model", str(hf), "--recipe", str(out / "recipe.json"),
                        "--seqlen", "32", "--checks", "b", "--json", str(tmp_path / "b.json")])
    assert rc == 0, capsys.readouterr().err[-3000:]
    b = json.loads((tmp_path / "b.json").read_text())["checks"][0]
    sparse = sum(1 for g in report["groups"] if g["pattern"] != "dense" for _ in g["modules"])
    assert b["status"] == "PASS" and b["details"]["sites"] == sparse
    assert recipe.name.startswith("autotune")
    # resumed: same work dir, other budget -> tables reused, nothing re-measured
    capsys.readouterr()
    argv[argv.index("50%")] = "60%"
    argv[argv.index(str(out))] = str(tmp_path / "out2")
    assert main(argv) in (0, 1)
    err = capsys.readouterr().err
    assert "reusing the cached table" in err and "speed: timing" not in err and "8:16 uniform: cached" in err


def test_check_pairs_are_seeded_and_spread_over_group_kinds():
    from nm_onnx.autotune.sensitivity import _check_pairs

    groups = {f"model.layers.{i}.{k}": [] for i in range(30) for k in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
    a = _check_pairs(groups, ["12:16", "8:16"], 8, 0)
    assert a == _check_pairs(groups, ["12:16", "8:16"], 8, 0) and len(set(a)) == 8
    assert {(g.rsplit(".", 1)[1], p) for g, p in a} == {(k, p) for k in ("attn_in", "attn_out", "mlp_in", "mlp_out")
                                                        for p in ("12:16", "8:16")}


def test_tighten_backs_off_until_the_verified_loss_fits():
    from nm_onnx.autotune.allocate import tighten

    options = _table(random.Random(3), groups=10)
    budget = 0.1

    def superadditive(alloc, i):  # groups interact: the real loss is 1.6x the summed prediction
        return {"delta_nll": 1.6 * alloc.cost}

    rounds, ok = tighten(options, budget, superadditive, max_rounds=5)
    assert ok is not None and rounds[ok][2]["delta_nll"] <= budget and ok >= 1
    bs = [b for b, _, _ in rounds]
    first = next(j for j, (_, _, v) in enumerate(rounds) if v["delta_nll"] <= budget)
    assert bs[0] == budget and all(b2 <= 0.9 * b1 for b1, b2 in itertools.pairwise(bs[:first + 1]))
    assert all(a.cost <= b + 1e-12 for b, a, _ in rounds)
    # after the first fit it bisects between the largest fitting and the smallest failing budget
    assert all(bs[first] < b < bs[first - 1] for b in bs[first + 1:])
    within = [a.saved for _, a, v in rounds if v["delta_nll"] <= budget]
    assert rounds[ok][1].saved == max(within)

    rounds, ok = tighten(options, budget, lambda a, i: {"delta_nll": 1.0}, max_rounds=3)
    # never fits: it shrinks each round and stops early once a smaller budget gives an allocation it tried
    assert ok is None and 2 <= len(rounds) <= 3
    assert len({tuple(sorted(a.choice.items())) for _, a, _ in rounds}) == len(rounds)


def test_tighten_grows_when_the_verified_loss_is_far_under_the_budget():
    from nm_onnx.autotune.allocate import allocate, tighten

    options = _table(random.Random(5), groups=12)
    budget = 0.05

    def subadditive(alloc, i):  # the real loss is a third of the summed predictions
        return {"delta_nll": alloc.cost / 3}

    rounds, ok = tighten(options, budget, subadditive, max_rounds=4)
    bs = [b for b, _, _ in rounds]
    assert bs[0] == budget and bs[1] > bs[0] and len(rounds) >= 2
    assert rounds[ok][2]["delta_nll"] <= budget
    assert rounds[ok][1].saved > allocate(options, budget).saved  # it found time the first round left
    assert rounds[ok][1].saved == max(a.saved for _, a, v in rounds if v["delta_nll"] <= budget)
    assert len({tuple(sorted(a.choice.items())) for _, a, _ in rounds}) == len(rounds)  # no allocation twice


@needs_library
@pytest.mark.slow
def test_autotune_with_a_shared_base_recipe(tmp_path, capsys):
    """`--base-recipe 8:16-magnitude+shared`: the recipe keeps share_selection (its groups are the
    selection groups), transform packs them, validate (b) holds on the packed sites."""
    from nm_onnx.transform import transform
    from nm_onnx.validate import main as validate_main

    export = wide_export()
    hf = export.parent / "wide-llama-hf"
    out = tmp_path / "out"
    rc = main(["autotune", str(hf), "--export", str(export), "--budget", "50%", "--out", str(out), "--work-dir",
               str(tmp_path / "work"), "--samples", "2", "--seqlen", "32", "--check", "3", "--limit", "1",
               "--eval-seqlen", "32", "--prompt", "8", "--decode", "4", "--repeats", "1", "--speed-repeats", "20",
               "--uniform", "8:16", "--quiet", "--base-recipe", "8:16-magnitude+shared"])
    assert rc in (0, 1), capsys.readouterr().err[-3000:]
    recipe = SparsityRecipe.load(out / "recipe.json")
    assert recipe.share_selection
    report = transform(export, tmp_path / "sparse", recipe)
    assert "packed" in report.passes.packed.values()
    rc = validate_main([str(export), str(tmp_path / "sparse"), "--model", str(hf), "--recipe", str(out / "recipe.json"),
                        "--seqlen", "32", "--checks", "b"])
    assert rc == 0, capsys.readouterr().err[-3000:]
