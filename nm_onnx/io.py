"""Safe outputs: nothing a user has is lost, overwritten or left half-written.

Everything nm-onnx writes (exports, calibration artifacts, transformed models, reports) goes through
this module:

* `check_output_dir` / `check_output_file` run before any slow work and refuse, with one actionable
  line (NmOnnxError, exit 2), an output that is one of the command's inputs, contains one or lies
  inside one (always, even with --overwrite), and an existing output that nm-onnx did not write as
  the same kind of output (unless the user passes --overwrite).
* `atomic_dir` / `atomic_file` / `atomic_path` stage the output in a hidden sibling and rename it
  into place only when it is complete; `atomic_dir` also writes the manifest (`MANIFEST`: kind,
  version, the files it wrote) that marks the directory as nm-onnx's own, so a later run may replace
  it, and only it, with the same kind of output.
* Staging names carry the host and the process id (`.nm-onnx-partial-<host>-<pid>-...`): an error or
  an interrupt removes the stage at once, and every later staging in the same folder removes the
  stages of processes that no longer exist (a SIGKILL leaves one behind), saying what it removed.
* `os_error` turns an OSError (read-only filesystem, disk full, permission denied, a missing or
  non-directory parent) into one NmOnnxError line naming the path and the fault.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from nm_onnx.errors import NmOnnxError

MANIFEST = "nm_onnx_manifest.json"
PARTIAL_PREFIX = ".nm-onnx-partial-"
_LIVE: set[Path] = set()  # staging paths of this process not yet renamed or removed
_HOST = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:32] or "host"


# ------------------------------------------------------------------------------------------ errors
_FAULTS = {
    errno.EROFS: "the filesystem is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.ENOENT: "no such file or directory",
    errno.EEXIST: "a file is in the way",
    errno.EISDIR: "it is a directory",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EFBIG: "the file is too large",
    errno.EMFILE: "too many open files",
}


def os_error(e: OSError, what: str | os.PathLike | None = None) -> NmOnnxError:
    """One actionable line for an OSError (`what`: the path the user gave, if the error has none)."""
    path = e.filename if e.filename is not None else what
    fault = _FAULTS.get(e.errno, e.strerror or type(e).__name__)
    hint = {
        errno.EROFS: "write the output to a writable folder",
        errno.ENOSPC: "free some space or write the output elsewhere",
        errno.EDQUOT: "free some space or write the output elsewhere",
        errno.EACCES: "check the permissions or write the output elsewhere",
        errno.EPERM: "check the permissions or write the output elsewhere",
        errno.ENOTDIR: "check the path",
    }.get(e.errno)
    where = f"'{path}': " if path is not None else ""
    return NmOnnxError(f"{where}{fault}" + (f"; {hint}" if hint else ""))


# ------------------------------------------------------------------------------------------ checks
def _resolved(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p)))).resolve()


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _check_against_inputs(out: Path, inputs, what: str) -> None:
    """Refuse an output that is an input, contains one, or lies inside one (a directory input)."""
    target = _resolved(out)
    for given in inputs:
        if given is None:
            continue
        src = _resolved(given)
        if target == src:
            raise NmOnnxError(f"{what} '{out}' is the input '{given}'; write the output somewhere else")
        if _inside(src, target):
            raise NmOnnxError(
                f"{what} '{out}' contains the input '{given}'; replacing it would delete the input: "
                "write the output somewhere else"
            )
        if src.is_dir() and _inside(target, src):
            raise NmOnnxError(
                f"{what} '{out}' lies inside the input '{given}'; write the output outside the input"
            )


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def read_manifest(path: str | os.PathLike) -> dict | None:
    """The manifest of a directory nm-onnx wrote, or None."""
    f = Path(path) / MANIFEST
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("kind"), str) else None


def _foreign_files(out: Path, kind: str) -> tuple[str | None, list[str]]:
    """(kind nm-onnx wrote here or None, files of `out` that nm-onnx did not write as `kind`)."""
    present = [f for f in _files(out) if f != MANIFEST]
    manifest = read_manifest(out)
    if manifest is None:
        return None, present
    ours = set(manifest.get("files") or [])
    return manifest["kind"], [f for f in present if manifest["kind"] != kind or f not in ours]


def check_output_dir(out: str | os.PathLike, kind: str, inputs=(), overwrite: bool = False,
                     option: str = "output") -> bool:
    """Check a directory output before the slow work; True when an earlier output will be replaced.

    Refuses (NmOnnxError) an output that is / contains / lies inside an input, a path that exists and
    is not a directory, and a non-empty directory that is not nm-onnx's own output of `kind` holding
    only what nm-onnx wrote, unless `overwrite`. Also refuses an output whose parent is not a
    directory or not writable (the fault named), so a long run never ends in a failed write.
    """
    out = Path(out)
    _check_against_inputs(out, inputs, option)
    if out.exists() and not out.is_dir():
        raise NmOnnxError(f"{option} '{out}' exists and is not a directory; give a directory path")
    replacing = False
    if out.is_dir() and any(out.iterdir()):
        made, foreign = _foreign_files(out, kind)
        if foreign and not overwrite:
            if made is not None and made != kind:
                why = f"holds an nm-onnx {made} output, not a {kind} output"
            else:
                sample = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                why = f"holds files nm-onnx did not write ({sample})"
            raise NmOnnxError(
                f"{option} directory '{out}' {why}; choose another {option} or pass --overwrite to replace it"
            )
        replacing = True
    check_parent_writable(out)
    return replacing


def check_work_dir(work: str | os.PathLike, inputs=(), kind: str = "autotune-work",
                   option: str = "--work-dir") -> None:
    """Check a resumable state directory: new, empty, or one nm-onnx marked as `kind` (its files grow as
    the work goes on, so the manifest's kind is what counts). Never a folder of the user's."""
    work = Path(work)
    check_output_dir(work, kind, inputs, overwrite=True, option=option)  # inputs, not-a-dir, parent faults
    if work.is_dir() and any(work.iterdir()) and (read_manifest(work) or {}).get("kind") != kind:
        raise NmOnnxError(f"{option} directory '{work}' holds files nm-onnx did not write; give an empty "
                          f"folder or the {option} of an earlier run to resume it")


def mark_work_dir(work: str | os.PathLike, kind: str = "autotune-work") -> None:
    """Create the state directory `check_work_dir` accepts on the next run."""
    Path(work).mkdir(parents=True, exist_ok=True)
    if read_manifest(work) is None:
        write_manifest(work, kind)


def check_output_file(out: str | os.PathLike, inputs=(), overwrite: bool = False, ours=None,
                      option: str = "output", companions=()) -> bool:
    """Check a file output before the slow work; True when an earlier output will be replaced.

    An existing file (or companion file, e.g. the `<name>_data` of a model) is replaced only when
    `ours(path)` says nm-onnx wrote it, or with `overwrite`.
    """
    out = Path(out)
    for p in (out, *companions):
        _check_against_inputs(Path(p), inputs, option)
    if out.is_dir():
        raise NmOnnxError(f"{option} '{out}' is a directory; give a file name")
    replacing = False
    mine = out.is_file() and ours is not None and _safe(ours, out)
    for p in (out, *companions):
        p = Path(p)
        if p.exists() and not overwrite and not mine:
            raise NmOnnxError(
                f"{option} '{p}' exists and was not written by nm-onnx; choose another {option} or pass "
                "--overwrite to replace it"
            )
        replacing = replacing or p.exists()
    check_parent_writable(out)
    return replacing


def _safe(pred, path) -> bool:
    try:
        return bool(pred(path))
    except Exception:  # noqa: BLE001 - an unreadable file is not ours
        return False


def check_parent_writable(out: str | os.PathLike) -> None:
    """The nearest existing ancestor of `out` must be a writable directory (missing parents are created)."""
    p = Path(os.path.abspath(out)).parent
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise NmOnnxError(f"cannot write '{out}': '{p}' is not a directory")
    try:  # a real write: os.access is fooled by root and by read-only mounts
        with tempfile.NamedTemporaryFile(prefix=PARTIAL_PREFIX + f"{_HOST}-{os.getpid()}-probe-", dir=p):
            pass
    except OSError as e:
        raise NmOnnxError(f"cannot write '{out}': {os_error(e, p)}") from None


# ------------------------------------------------------------------------------------------ staging
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(parent: str | os.PathLike) -> list[Path]:
    """Remove the staging leftovers of dead nm-onnx processes of this host in `parent`; say so."""
    parent = Path(parent)
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    mine = f"{PARTIAL_PREFIX}{_HOST}-"
    for p in entries:
        if not p.name.startswith(mine):
            continue
        pid_s = p.name[len(mine):].split("-", 1)[0]
        if not pid_s.isdigit() or _alive(int(pid_s)):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError:
            continue
        removed.append(p)
        print(f"nm-onnx: removed '{p}', a partial output left by an interrupted run (process {pid_s})",
              file=sys.stderr)
    return removed


def remove_live_partials() -> None:
    """Remove every staging path this process still holds (the CLI calls it when interrupted, so a
    signal that lands between creating a stage and entering its clean-up block leaves nothing)."""
    for p in list(_LIVE):
        _remove(p)


def _stage_prefix(name: str) -> str:
    return f"{PARTIAL_PREFIX}{_HOST}-{os.getpid()}-{name[:60]}-"


def _mkdirs(parent: Path) -> None:
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, parent) from None
    if not parent.is_dir():
        raise NmOnnxError(f"'{parent}' is not a directory")


def staging_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new hidden staging directory in `parent` (created); the caller removes or renames it."""
    parent = Path(parent)
    _mkdirs(parent)
    remove_stale_partials(parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_stage_prefix(name), dir=parent))
    except OSError as e:
        raise os_error(e, parent) from None
    _LIVE.add(tmp)
    tmp.chmod(0o777 & ~_umask())
    return tmp


def remove_stage(p: Path) -> None:
    """Remove a staging path made by `staging_dir` (and forget it)."""
    _remove(Path(p))


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()
    _LIVE.discard(p)


def _renamed(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)
    _LIVE.discard(tmp)


def write_manifest(directory: str | os.PathLike, kind: str, extra: dict | None = None) -> None:
    """Mark `directory` as nm-onnx's output of `kind`, listing the files it holds now."""
    from nm_onnx import __version__

    d = Path(directory)
    body = {"kind": kind, "nm_onnx_version": __version__, "files": _files(d), **(extra or {})}
    (d / MANIFEST).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _removed_on_failure(tmp: Path, final: Path):
    """Remove the staging `tmp` when the block fails (interrupts included); an OSError is named on `final`."""
    try:
        yield
    except OSError as e:
        _remove(tmp)
        raise os_error(e, final) from None
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, kind: str, overwrite: bool = False, inputs=(), manifest: dict | None = None):
    """Yield a staging directory; when the block succeeds, write the manifest and rename it to `final`.

    The output check (`check_output_dir`) runs first; an existing `final` is replaced only as that
    check allows, and the replacement is two renames (the old output is removed after).
    """
    final = Path(final)
    if check_output_dir(final, kind, inputs, overwrite):
        print(f"nm-onnx: replacing the earlier {kind} output '{final}'", file=sys.stderr)
    tmp = staging_dir(final.parent, final.name)
    with _removed_on_failure(tmp, final):
        yield tmp
        write_manifest(tmp, kind, manifest)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=_stage_prefix(final.name + "-old"), dir=final.parent))
            os.replace(final, old / "x")
            _renamed(tmp, final)
            _remove(old)
        else:
            _renamed(tmp, final)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike):
    """Yield a temporary *path* beside `final` (for writers that want a file name); rename it on success."""
    final = Path(final)
    _mkdirs(final.parent)
    remove_stale_partials(final.parent)
    try:
        fd, name = tempfile.mkstemp(prefix=_stage_prefix(final.name), dir=final.parent)
        tmp = Path(name)
        _LIVE.add(tmp)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError as e:
        raise os_error(e, final.parent) from None
    with _removed_on_failure(tmp, final):
        yield tmp
        _renamed(tmp, final)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike, mode: str = "w", **kwargs):
    """Open a temporary sibling file for writing; rename it to `final` when the block succeeds."""
    with atomic_path(final) as tmp:
        try:
            with open(tmp, mode, **kwargs) as f:
                yield f
        except OSError as e:
            raise os_error(e, final) from None


def write_json(final: str | os.PathLike, data, kind: str | None = None) -> None:
    """Atomically write a JSON report; with `kind`, mark it (`nm_onnx` key) so it may be replaced later."""
    body = dict(data) if kind is not None else data
    if kind is not None:
        from nm_onnx import __version__

        body["nm_onnx"] = {"kind": kind, "version": __version__}
    with atomic_file(final) as f:
        json.dump(body, f, indent=2, default=float)
        f.write("\n")


def json_kind(path: str | os.PathLike) -> str | None:
    """The `kind` of a JSON report written by `write_json(kind=...)`, or None."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    mark = d.get("nm_onnx") if isinstance(d, dict) else None
    return mark.get("kind") if isinstance(mark, dict) else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
