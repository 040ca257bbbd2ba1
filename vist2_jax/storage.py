"""The one path layer: every file the project reads or writes goes through here.

A path is an ``etils.epath.Path`` (what Orbax, Grain and TFDS use too), so a run
directory, a tokenizer or a prepared dataset may live on local disk or in a bucket
(``gs://bucket/runs/0.6b``; ``gs://`` is served by ``gcsfs``, and Orbax writes arrays
there through TensorStore's GCS driver). Object stores differ from a disk in three ways,
handled here and nowhere else:

* no append: :class:`AppendFile` rewrites the whole object, at most every ``flush_s``;
* no cheap rename: objects appear whole once their upload is finalised, so
  :func:`open_atomic` / :func:`write_atomic` write them in place (discarding the upload on
  an error) and only local files go through a temporary file + ``os.replace``;
* libraries that only open local files (SentencePiece, the tokenizers library, the
  SentencePiece trainer): :func:`local_copy` downloads once per process, and
  :func:`scratch_folder` holds files a command makes for itself (never in a run it reads).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import io
import os
import shutil
import tempfile
import time
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]
_UPLOAD_BLOCK = 16 * 2**20  # bytes per read/write when copying files to or from a store


class StorageFull(OSError):
    """A write that does not fit: one line naming the folder and the bytes needed."""


def free_bytes(path: PathLike) -> int | None:
    """Free bytes of the filesystem holding ``path`` (its nearest existing parent); None
    for object stores, which have no such limit."""
    if is_remote(path):
        return None
    folder = os.path.abspath(os.fspath(as_path(path)))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def is_disk_full(err: BaseException) -> bool:
    """True when ``err`` or an error it was raised from is "no space left on device"
    (an ``OSError`` from Python, or a message from TensorStore or gcsfs)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(err) or "RESOURCE_EXHAUSTED" in str(err) and "space" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


class StorageUnavailable(OSError):
    """An object store that kept failing a write for longer than ``retry_seconds()``."""


def retry_seconds() -> float:
    """How long a write to an object store is retried before the run stops
    (``VIST2_STORAGE_RETRY_S``, default 120 s)."""
    return float(os.environ.get("VIST2_STORAGE_RETRY_S", "120"))


_TRANSIENT_WORDS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "Connection reset", "Connection refused",
                    "Server disconnected", "timed out", "Timeout")


def is_transient(err: BaseException) -> bool:
    """An object-store error worth retrying: a connection or timeout error, an HTTP 408 /
    429 / 5xx (gcsfs's own rule), or a TensorStore status saying the same. A write whose
    reply was lost can come back as "not found" (the upload session is gone): also retried."""
    try:
        from gcsfs.retry import is_retriable
    except ImportError:  # gcsfs is what serves gs://; without it nothing here is remote
        def is_retriable(_):
            return False
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ConnectionError, TimeoutError, FileNotFoundError)) or is_retriable(err):
            return True
        if any(word in str(err) for word in _TRANSIENT_WORDS):
            return True
        err = err.__cause__ or err.__context__
    return False


def retrying(path: PathLike, write):
    """``write()`` for an object at ``path``, again with backoff (1, 2, 4 ... 16 s) while it
    fails with a transient error, for at most ``retry_seconds()``; then
    :class:`StorageUnavailable`, one line. Local paths are written once."""
    if not is_remote(path):
        with _reporting_full_disk(path):
            return write()
    deadline, delay = time.monotonic() + retry_seconds(), 1.0
    while True:
        try:
            return write()
        except Exception as err:
            if not is_transient(err) or (isinstance(err, FileNotFoundError) and _no_bucket(path)):
                raise
            if time.monotonic() + delay > deadline:
                reason = " ".join(str(err).split())[:160] or type(err).__name__
                raise StorageUnavailable(
                    f"{path}: the store kept failing for {retry_seconds():.0f} s ({type(err).__name__}: "
                    f"{reason}); stopped: rerun to resume from the last checkpoint") from None
            time.sleep(delay)
            delay = min(2 * delay, 16.0)


@contextlib.contextmanager
def _reporting_full_disk(path: PathLike):
    """A local write that finds the disk full is one line naming the file."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise StorageFull(f"{path}: no space left on device ({free_bytes(path):,} bytes free); "
                          "free space and rerun to resume from the last checkpoint") from None


def _no_bucket(path: PathLike) -> bool:
    """True when the bucket of ``path`` does not exist (a mistyped name: not worth retrying)."""
    scheme, rest = os.fspath(path).split("://", 1)
    try:
        return not as_path(f"{scheme}://{rest.split('/', 1)[0]}").exists()
    except Exception:  # the store itself is unreachable: retry
        return False


def as_path(path: PathLike) -> epath.Path:
    """``path`` as an ``epath.Path``; ``~`` is expanded for local paths."""
    if isinstance(path, epath.Path):
        return path
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.expanduser(text))


def is_remote(path: PathLike) -> bool:
    """True for object-store URLs (``gs://``, ``s3://``, ...), False for local paths."""
    return "://" in os.fspath(path)


def absolute(path: PathLike) -> epath.Path:
    """Local paths made absolute (a later ``chdir`` must not move a run); URLs unchanged."""
    path = as_path(path)
    return path if is_remote(path) else epath.Path(os.path.abspath(os.fspath(path)))


def write_atomic(path: PathLike, data: bytes | str) -> epath.Path:
    """Write ``path`` so that a reader sees the old content or the new, never half of it
    (retried on an object store, see :func:`retrying`)."""
    data = data.encode("utf-8") if isinstance(data, str) else data

    def write():
        with open_atomic(path) as f:
            f.write(data)

    retrying(path, write)
    return as_path(path)


@contextlib.contextmanager
def open_atomic(path: PathLike):
    """``open(path, "wb")`` for a file that appears whole or not at all: locally a temporary
    sibling renamed on success; on an object store the object itself, published when the
    upload is finalised (a rename there would copy every byte again) and discarded when the
    writer raises (closing it would publish a truncated object)."""
    path = as_path(path)
    if is_remote(path):
        target = path.open("wb")
        try:
            yield target
        except BaseException:
            target.closed = True  # fsspec: close() now commits nothing
            try:  # cancel a started resumable upload (best effort: unfinalised ones expire)
                getattr(target, "discard", lambda: None)()
            except Exception:
                pass
            raise
        target.close()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.fspath(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, os.fspath(path))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def move(source: PathLike, destination: PathLike) -> None:
    """Move a file or a folder (a rename on disk; copy + delete on object stores)."""
    source, destination = as_path(source), as_path(destination)
    if not (is_remote(source) or is_remote(destination)):
        shutil.move(os.fspath(source), os.fspath(destination))
        return
    # Object stores have no folders to rename (a "folder" is a name prefix): copy each
    # object (server-side within a store), then delete the originals.
    if not source.is_dir():
        source.copy(destination)
        source.unlink()
        return
    prefix = os.fspath(source).split("://", 1)[-1].rstrip("/")
    for folder, _, files in source.walk():  # folders come back without the scheme
        relative = os.fspath(folder).split("://", 1)[-1][len(prefix):].lstrip("/")
        for name in files:
            (source / relative / name).copy(destination / relative / name)
    source.rmtree()


_downloads: dict[str, str] = {}
_scratch_root: str | None = None


def scratch_folder(key: str) -> str:
    """A local folder of this process for ``key`` (the same folder for the same key),
    under one temporary folder removed at exit."""
    global _scratch_root
    if _scratch_root is None:
        _scratch_root = tempfile.mkdtemp(prefix="vist2-")
        atexit.register(shutil.rmtree, _scratch_root, ignore_errors=True)
    folder = os.path.join(_scratch_root, hashlib.sha256(key.encode()).hexdigest()[:16])
    os.makedirs(folder, exist_ok=True)
    return folder


def local_copy(path: PathLike) -> str:
    """A local file name with the content of ``path``: the path itself when it is local,
    else a copy downloaded once per process into a :func:`scratch_folder`.
    The copy keeps the file name (``tokenizer.json``, ``x.model``), which loaders use."""
    path = as_path(path)
    if not is_remote(path):
        return os.fspath(path)
    key = os.fspath(path)
    if key not in _downloads:
        local = os.path.join(scratch_folder(key), path.name)
        with path.open("rb") as source, open(local, "wb") as f:
            shutil.copyfileobj(source, f, _UPLOAD_BLOCK)
        _downloads[key] = local
    return _downloads[key]



def upload(local: PathLike, destination: PathLike) -> epath.Path:
    """Copy a local file to ``destination`` (which may be remote), atomically, 16 MiB at a
    time: a multi-GB file (a safetensors shard) is never held in memory whole."""
    def write():
        with open(os.fspath(local), "rb") as source, open_atomic(destination) as target:
            shutil.copyfileobj(source, target, _UPLOAD_BLOCK)

    retrying(destination, write)
    return as_path(destination)


class AppendFile:
    """A text file written by appending lines (``metrics.jsonl``).

    On disk each ``append`` is written and flushed at once. On an object store the
    content is kept in memory and the whole object rewritten on ``flush`` when
    ``flush_s`` passed since the last upload, and always on ``close``; a crash loses at
    most ``flush_s`` seconds of lines (a resume truncates to the checkpoint anyway).
    """

    def __init__(self, path: PathLike, flush_s: float = 30.0):
        self.path, self.flush_s = as_path(path), flush_s
        self.remote = is_remote(self.path)
        self._buffer = io.StringIO()
        self._uploaded_at: float | None = None  # monotonic time of the last upload; None: never
        self._dirty = False
        if self.remote and self.path.exists():
            self._buffer.write(self.path.read_text())

    def read_lines(self) -> list[str]:
        if self.remote:
            return self._buffer.getvalue().splitlines()
        return self.path.read_text().splitlines() if self.path.exists() else []

    def replace_lines(self, lines: list[str]) -> None:
        """Rewrite the file with ``lines`` (used to drop records past a resumed step)."""
        text = "".join(line + "\n" for line in lines)
        if self.remote:
            self._buffer = io.StringIO(text)
            self._buffer.seek(0, io.SEEK_END)
        write_atomic(self.path, text)
        self._uploaded_at = time.monotonic()

    def append(self, line: str) -> None:
        if self.remote:
            self._buffer.write(line + "\n")
            self._dirty = True
            self.flush(force=False)
            return
        with _reporting_full_disk(self.path), open(os.fspath(self.path), "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def flush(self, force: bool = True) -> None:
        if not (self.remote and self._dirty):
            return
        # ``time.monotonic()`` counts from an arbitrary origin (boot on Linux), so "never
        # uploaded" is None, not 0.0: a machine up for less than ``flush_s`` still uploads.
        due = self._uploaded_at is None or time.monotonic() - self._uploaded_at >= self.flush_s
        if force or due:
            text = self._buffer.getvalue()
            retrying(self.path, lambda: self.path.write_text(text))
            self._uploaded_at, self._dirty = time.monotonic(), False

    def close(self) -> None:
        self.flush(force=True)


class _ObjectRecordWriter:
    """A TensorBoard event file on an object store, written through the path layer: the
    records are kept in memory and the whole object is rewritten on each flush (the
    SummaryWriter flushes every ``flush_secs``)."""

    def __init__(self, path: str):
        self.path, self.buffer, self.dirty = as_path(path), io.BytesIO(), False

    def write(self, data: bytes) -> None:
        self.buffer.write(data)
        self.dirty = True

    def flush(self) -> None:
        if self.dirty:
            data = self.buffer.getvalue()
            retrying(self.path, lambda: self.path.write_bytes(data))
            self.dirty = False

    def close(self) -> None:
        self.flush()


class _ObjectRecordWriterFactory:
    def open(self, path: str) -> _ObjectRecordWriter:
        return _ObjectRecordWriter(path)

    def directory_check(self, path: str) -> None:
        as_path(path).mkdir(parents=True, exist_ok=True)


def tensorboard_writer(logdir: PathLike, **kwargs):
    """A ``tensorboardX.SummaryWriter`` whose event files go through this path layer
    (tensorboardX's own ``gs://`` writer would bypass it)."""
    from tensorboardX import SummaryWriter, record_writer

    logdir = as_path(logdir)
    if is_remote(logdir):
        scheme = os.fspath(logdir).split("://", 1)[0]
        record_writer.register_writer_factory(scheme, _ObjectRecordWriterFactory())
    return SummaryWriter(os.fspath(logdir), **kwargs)
