"""Where the sweep's jobs run: `local` (this process, in order) or `ray` (one Ray task per job).

Both run the same job functions (nm_onnx.sweep.jobs.run_job) and return the same outcome per job:
{"status": "cached" | "computed" | "failed" | "skipped", "result": {...} | "error": "one line"}.
A job that raises is `failed` with its one-line error, the jobs that need its result are `skipped`
naming it, and every other job still runs. Ray: each job is a task declaring `cpus_per_job` CPUs,
retried by Ray when its worker dies (`max_retries`), its dependencies passed as object refs
(export -> calibrate -> transform -> evaluate), so Ray schedules a job when its inputs exist.
Ray is optional (`pip install nm-onnx[cluster]`); every job must see the sweep folder (one machine,
or a filesystem shared by the cluster's nodes).
"""

from __future__ import annotations

import os
import sys
import time

from nm_onnx.errors import NmOnnxError
from nm_onnx.sweep.jobs import Job, run_job

BACKENDS = ("local", "ray")


def error_line(e: BaseException) -> str:
    """The one-line form of a job's exception (NmOnnxError as written, others with their type)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    line = text if isinstance(e, NmOnnxError) else f"{type(e).__name__}: {text}".rstrip(": ")
    return line[:300]


def _step(msg: str) -> None:
    print(f"[sweep {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def outcome(root: str, job: Job, dep_outcomes: dict[str, dict], fresh: bool) -> dict:
    """Run one job given its dependencies' outcomes; never raises an Exception."""
    for d in job.deps:
        if dep_outcomes[d]["status"] in ("failed", "skipped"):
            why = dep_outcomes[d]["error"]
            return {"status": "skipped", "error": why if why.startswith(("export", "calibrate", "autotune", "transform"))
                    else f"{d.split(':')[0]} failed: {why}"}
    try:
        status, result = run_job(root, job, {d: dep_outcomes[d]["result"] for d in job.deps}, fresh)
    except Exception as e:  # noqa: BLE001 - a job's failure is reported in its cell; the others go on
        return {"status": "failed", "error": f"{job.kind} failed: {error_line(e)}"}
    return {"status": status, "result": result}


def run_local(root: str, jobs: list[Job], fresh: bool = False, **_) -> dict[str, dict]:
    done: dict[str, dict] = {}
    for i, job in enumerate(jobs, 1):
        done[job.id] = outcome(root, job, done, fresh)
        o = done[job.id]
        _step(f"{i}/{len(jobs)} {job.id}: {o['status']}" + (f" ({o['error']})" if "error" in o else ""))
    return done


def _remote_outcome(root, job, fresh, *dep_outcomes):
    return outcome(root, job, dict(zip(job.deps, dep_outcomes)), fresh)


def import_ray():
    try:
        import ray
    except ImportError:
        raise NmOnnxError("--backend ray needs Ray, which is not installed: pip install 'nm-onnx[cluster]' "
                          "(or run with --backend local)") from None
    return ray


def run_ray(root: str, jobs: list[Job], fresh: bool = False, address: str | None = None, cpus_per_job: int = 1,
            max_retries: int = 2, **_) -> dict[str, dict]:
    ray = import_ray()
    if not ray.is_initialized():
        env = {k: os.environ[k] for k in ("PYTHONPATH", "HF_HUB_OFFLINE", "NM_ONNX_CACHE", "NM_ONNX_DATA",
                                           "NM_ONNX_OPS_LIB") if k in os.environ}
        try:
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
        except Exception as e:  # noqa: BLE001 - a wrong address, a dead cluster: one line
            raise NmOnnxError(f"cannot start or reach Ray (address {address or 'local'}): {error_line(e)}") from None
    task = ray.remote(num_cpus=cpus_per_job, max_retries=max_retries, retry_exceptions=False)(_remote_outcome)
    refs = {}
    for job in jobs:  # dependency order: every dep's ref exists when a job is submitted
        refs[job.id] = task.remote(root, job, fresh, *(refs[d] for d in job.deps))
    done: dict[str, dict] = {}
    for i, job in enumerate(jobs, 1):
        try:
            done[job.id] = ray.get(refs[job.id])
        except Exception as e:  # noqa: BLE001 - the worker died past its retries
            done[job.id] = {"status": "failed", "error": f"{job.kind} failed on Ray: {error_line(e)}"}
        o = done[job.id]
        _step(f"{i}/{len(jobs)} {job.id}: {o['status']}" + (f" ({o['error']})" if "error" in o else ""))
    return done


def run(backend: str, root: str, jobs: list[Job], **kw) -> dict[str, dict]:
    if backend == "local":
        return run_local(root, jobs, **kw)
    if backend == "ray":
        return run_ray(root, jobs, **kw)
    raise NmOnnxError(f"--backend {backend!r}: use one of {', '.join(BACKENDS)}")
