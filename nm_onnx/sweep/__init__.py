"""`nm-onnx sweep`: models x recipes x evaluations as cached jobs, one aggregated report.

spec.py reads and checks the spec; jobs.py plans the jobs (export -> calibrate -> transform ->
evaluate) and runs one, cached by content under OUT/cache; backends.py runs them (local or Ray);
report.py turns their outcomes into one table. `run_sweep` ties them together and owns the output
folder (nm_onnx.io): a new or empty folder, or one an earlier sweep made (whose cache it resumes).
`execute` is the part without the folder and the files: `nm-onnx demo` runs its built-in spec with it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

SWEEP_KIND = "sweep"


def claim_sweep_dir(out, inputs, overwrite: bool = False) -> None:
    """Make `out` the sweep's folder before any slow work (never deleting anything in it).

    A new or empty folder is marked as a sweep's; a folder an earlier sweep marked is resumed; any
    other non-empty folder is refused unless `overwrite` (then the sweep writes beside its files).
    An output that is, contains or lies inside an input is always refused.
    """
    from nm_onnx.errors import NmOnnxError
    from nm_onnx.io import check_output_dir, read_manifest, write_manifest

    out = Path(out)
    check_output_dir(out, SWEEP_KIND, inputs, overwrite=True, option="--out")  # inputs, type, writable parent
    if out.is_dir() and any(out.iterdir()):
        mark = read_manifest(out)
        if mark is not None and mark.get("kind") == SWEEP_KIND:
            return
        if not overwrite:
            what = f"an nm-onnx {mark['kind']} output" if mark else "files nm-onnx did not write"
            raise NmOnnxError(f"--out '{out}' holds {what}; choose a new or empty folder, the folder of an "
                              "earlier sweep (to resume it), or pass --overwrite to write beside those files")
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, SWEEP_KIND, {"files": []})


def execute(s, out, backend: str = "local", address: str | None = None, cpus_per_job: int = 1,
            fresh: bool = False) -> tuple[dict, dict[str, dict]]:
    """(report table, {job id: outcome}) of spec `s` run into the claimed folder `out`."""
    from nm_onnx.sweep import backends, jobs, report

    planned = jobs.plan(s)
    print(f"nm-onnx sweep: {len(s.models)} model(s) x {len(s.recipes)} recipe(s) x {len(s.evaluations)} "
          f"evaluation(s) = {len(planned)} jobs ({backend})", file=sys.stderr, flush=True)
    root = str(Path(out).resolve())
    outcomes = backends.run(backend, root, planned, fresh=fresh, address=address, cpus_per_job=cpus_per_job)
    return report.table(s, planned, outcomes), outcomes


def run_sweep(spec_path, out, backend: str = "local", address: str | None = None, cpus_per_job: int = 1,
              fresh: bool = False, overwrite: bool = False) -> dict:
    """Run (or resume) the sweep of `spec_path` into `out`; returns the report (also written there)."""
    from nm_onnx.io import atomic_file, write_json
    from nm_onnx.sweep import backends, report, spec

    t0 = time.time()
    s = spec.load_spec(spec_path)
    if backend == "ray":
        backends.import_ray()  # a missing extra is named before any work
    claim_sweep_dir(out, s.inputs(), overwrite)
    rep, _ = execute(s, out, backend, address, cpus_per_job, fresh)
    rep["seconds"] = time.time() - t0
    rep["spec"] = str(spec_path)
    md = report.markdown(rep, f"nm-onnx sweep: {Path(spec_path).name}")
    write_json(Path(out) / "report.json", rep, kind="sweep-report")
    with atomic_file(Path(out) / "report.md") as f:
        f.write(md + "\n")
    print(md)
    print(f"nm-onnx sweep: {rep['jobs']} in {rep['seconds']:.0f} s; report: {Path(out) / 'report.md'}",
          file=sys.stderr)
    return rep
