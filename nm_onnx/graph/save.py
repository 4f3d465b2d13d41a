"""Writing large ONNX models: external data copied, not loaded, with the model file appearing last.

Used by `transform`: every initializer over 1 KiB (and every external one) goes to one data file at
4096-byte-aligned offsets; external source tensors are streamed with plain reads, never loaded whole
(`_DataWriter`, O_DIRECT where the filesystem accepts it); a transform may start copying a model's
external weights into a staged data file while its passes run (`Prewrite`); `save_model` then writes
the model (+ `<name>_data`) through a staging directory so the model file appears last, atomically.
Outputs over `EXTERNAL_THRESHOLD` always use external data (protobuf's 2 GB limit).
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

from nm_onnx.errors import NmOnnxError

EXTERNAL_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, with room for the graph


def has_external(model) -> bool:
    import onnx_ir as ir

    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def weight_bytes(model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


_ALIGN = 4096  # tensor offsets in the data file: page-aligned (mmap-friendly, O_DIRECT-friendly)
_COPY_CHUNK = 32 * 1024 * 1024  # bytes per write (a multiple of _ALIGN)
_INLINE_MAX = 1024  # tensors up to this size stay inside the model file


class _DataWriter:
    """Writes the external data file sequentially, with O_DIRECT where the filesystem allows it.

    Why not `onnx_ir.save(external_data=...)`: on these VMs buffered writes of fresh page-cache pages
    run at ~0.35 GB/s against ~1.5 GB/s for O_DIRECT, and copying 13 GB dominated the 7B benchmark.
    Each tensor starts at a 4096-byte offset. Data goes through two 32 MiB aligned buffers: the
    calling thread fills one (plain reads of external source tensors, never loaded whole) while a
    writer thread writes the other.
    """

    def __init__(self, path: Path):
        from concurrent.futures import ThreadPoolExecutor

        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        direct = getattr(os, "O_DIRECT", 0)
        try:
            self.fd = os.open(path, flags | direct, 0o666)
            self.direct = bool(direct)
        except OSError:  # e.g. tmpfs: no O_DIRECT
            self.fd = os.open(path, flags, 0o666)
            self.direct = False
        self.bufs = [mmap.mmap(-1, _COPY_CHUNK) for _ in range(2)]  # anonymous: page-aligned
        self.views = [memoryview(b) for b in self.bufs]
        self.pending = [None, None]  # write future per buffer
        self.cur = 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nm-onnx-write")
        self.offset = 0  # file offset of the next write: a multiple of _ALIGN
        self.end = 0  # end of the real data (the file is truncated to it)

    def _write(self, view: memoryview, n: int, padded: int) -> None:
        if padded > n:
            view[n:padded] = bytes(padded - n)
        done = 0
        while done < padded:
            try:
                done += os.write(self.fd, view[done:padded])
            except OSError as e:
                if not self.direct or e.errno != errno.EINVAL:
                    raise
                import fcntl  # the filesystem refused O_DIRECT writes: continue buffered

                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False

    def _buffer(self) -> memoryview:
        """The current buffer, once its previous write has finished."""
        if self.pending[self.cur] is not None:
            self.pending[self.cur].result()
            self.pending[self.cur] = None
        return self.views[self.cur]

    def _submit(self, n: int) -> None:
        padded = -(-n // _ALIGN) * _ALIGN  # only a tensor's last piece is shorter than _COPY_CHUNK
        self.pending[self.cur] = self.pool.submit(self._write, self.views[self.cur], n, padded)
        self.offset += padded
        self.cur ^= 1

    def add(self, tensor) -> int:
        """Append one tensor; returns its offset."""
        import onnx_ir as ir

        start, size = self.offset, tensor.nbytes
        if isinstance(tensor, ir.ExternalTensor):
            with open(tensor.path, "rb", buffering=0) as f:
                f.seek(tensor.offset or 0)
                for piece in range(0, size, _COPY_CHUNK):
                    want = min(_COPY_CHUNK, size - piece)
                    view, got = self._buffer(), 0
                    while got < want:
                        k = f.readinto(view[got:want])
                        if not k:
                            raise NmOnnxError(f"external data of '{tensor.name}' in '{tensor.path}' is truncated")
                        got += k
                    self._submit(want)
        else:
            data = memoryview(tensor.tobytes())
            for piece in range(0, size, _COPY_CHUNK):
                chunk = data[piece:piece + _COPY_CHUNK]
                self._buffer()[: len(chunk)] = chunk
                self._submit(len(chunk))
        self.end = start + size
        return start

    def close(self) -> None:
        try:
            for f in self.pending:  # surface a failed write
                if f is not None:
                    f.result()
            os.ftruncate(self.fd, self.end)
        finally:
            self.pool.shutdown(wait=True)
            os.close(self.fd)
            for v, b in zip(self.views, self.bufs):
                v.release()
                b.close()


class Prewrite:
    """Copies the model's external weights into a staged output data file on a background thread.

    The passes only add initializers (they never change an existing weight), so the 13 GB copy of a
    7B model can run while the passes compute their constants (I/O against CPU); `save_model` then
    appends the new tensors to the same file. The staging directory is a hidden sibling of the
    output, removed by `close()` whatever happens.
    """

    def __init__(self, model, parent: Path):
        import threading

        import onnx_ir as ir

        from nm_onnx.io import staging_dir

        self.dir = staging_dir(parent, "transform-data")
        self.path = self.dir / "data"
        self.tensors = [v.const_value for g in model.graphs() for v in g.initializers.values()
                        if isinstance(v.const_value, ir.ExternalTensor)]
        self.offsets: dict[int, int] = {}  # id(tensor) -> offset in the staged file
        self.writer: _DataWriter | None = _DataWriter(self.path)
        self.stop = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="nm-onnx-prewrite", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for t in self.tensors:
                if self.stop:
                    return
                self.offsets[id(t)] = self.writer.add(t)
        except BaseException as e:  # noqa: BLE001 (re-raised on the calling thread by finish())
            self.error = e

    def finish(self) -> _DataWriter:
        """The writer, once every original weight is in the file (raises the copy's error, if any)."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.writer

    def close(self) -> None:
        self.stop = True
        self.thread.join()
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError:
                pass
            self.writer = None
        from nm_onnx.io import remove_stage

        remove_stage(self.dir)


def _save_external(model, out_file: Path, data_name: str, prewrite: Prewrite | None = None) -> Path:
    """Write every initializer over _INLINE_MAX bytes (and every external one) to a data file, then the
    model (which refers to it as `data_name`); returns the data file's path (rename it beside the model)."""
    import onnx_ir as ir

    values = [v for g in model.graphs() for v in g.initializers.values()
              if v.const_value is not None
              and (isinstance(v.const_value, ir.ExternalTensor) or v.const_value.nbytes > _INLINE_MAX)]
    if prewrite is not None:
        writer, done, data_path = prewrite.finish(), prewrite.offsets, prewrite.path
    else:
        writer, done, data_path = _DataWriter(out_file.parent / data_name), {}, out_file.parent / data_name
    originals = []
    try:
        for v in values:
            t = v.const_value
            offset = done[id(t)] if id(t) in done else writer.add(t)
            originals.append((v, t))
            v.const_value = ir.ExternalTensor(data_name, offset, t.nbytes, t.dtype, shape=t.shape, name=t.name,
                                              base_dir=out_file.parent)
        writer.close()
        if prewrite is not None:
            prewrite.writer = None
        writer = None
        ir.save(model, out_file)
    finally:
        if writer is not None and prewrite is None:
            writer.close()
        for v, t in originals:
            v.const_value = t
    return data_path


def save_model(model, out_file: Path, external: bool, prewrite: Prewrite | None = None) -> None:
    """Write model (+ `<name>_data` when external) so the model file appears last, atomically."""
    import onnx_ir as ir

    from nm_onnx.io import os_error, remove_stage, staging_dir

    out_file = Path(out_file)
    data_name = f"{out_file.name}_data"
    tmp = staging_dir(out_file.parent, out_file.name)
    try:
        if external:
            data_path = _save_external(model, tmp / out_file.name, data_name, prewrite)
            os.replace(data_path, out_file.parent / data_name)
        else:
            ir.save(model, tmp / out_file.name)
        os.replace(tmp / out_file.name, out_file)
    except OSError as e:
        raise os_error(e, out_file) from None
    finally:
        remove_stage(tmp)


