"""The path layer (``vist2_jax.storage``) on local disk and on ``gs://`` (a Cloud Storage
emulator): atomic writes, appends that survive a reopen, downloads for local-only
libraries, moves, and TensorBoard event files on a bucket."""

import json
import os

import pytest

from conftest import read_scalar_events
from vist2_jax import storage


def test_write_atomic_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "deep" / "config.yaml"
    storage.write_atomic(target, "a: 1\n")
    storage.write_atomic(target, b"a: 2\n")
    assert target.read_text() == "a: 2\n"
    assert os.listdir(target.parent) == ["config.yaml"]


def test_append_file_on_disk_writes_each_line_at_once(tmp_path):
    log = storage.AppendFile(tmp_path / "metrics.jsonl")
    log.append('{"step": 1}')
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'  # before any flush or close
    log.replace_lines(['{"step": 0}'])
    log.append('{"step": 2}')
    assert storage.AppendFile(tmp_path / "metrics.jsonl").read_lines() == ['{"step": 0}', '{"step": 2}']


def test_append_file_on_a_bucket_uploads_on_flush_interval_and_close(gcs_bucket):
    path = storage.as_path(f"{gcs_bucket}/append/metrics.jsonl")
    log = storage.AppendFile(path, flush_s=3600)
    log.append("first")  # the first append uploads (nothing uploaded yet this hour)
    assert path.read_text() == "first\n"
    log.append("second")
    assert path.read_text() == "first\n"  # within flush_s: kept in memory
    log.flush()
    assert path.read_text() == "first\nsecond\n"
    log.append("third")
    log.close()
    reopened = storage.AppendFile(path)
    assert reopened.read_lines() == ["first", "second", "third"]
    reopened.replace_lines(["first"])
    assert path.read_text() == "first\n"


def test_append_file_uploads_its_first_line_on_a_freshly_booted_machine(gcs_bucket, monkeypatch):
    """``time.monotonic()`` counts from boot: with the clock a few seconds after boot (less
    than ``flush_s``) the first line is still uploaded at once, and the next ones wait for
    ``flush_s`` from that upload."""
    import time

    clock = [2.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    path = storage.as_path(f"{gcs_bucket}/fresh-boot/metrics.jsonl")
    log = storage.AppendFile(path, flush_s=30)
    log.append("first")
    assert path.read_text() == "first\n"
    clock[0] = 20.0
    log.append("second")
    assert path.read_text() == "first\n"  # 18 s after the first upload: held
    clock[0] = 32.5
    log.append("third")
    assert path.read_text() == "first\nsecond\nthird\n"


def test_upload_streams_in_blocks_and_a_failed_upload_publishes_nothing(gcs_bucket, tmp_path, monkeypatch):
    """A file larger than one block (a resumable upload on GCS) arrives whole, locally and on
    the bucket; an upload failing half-way leaves no object (nor a local temporary file)."""
    import shutil

    data = os.urandom(2 * storage._UPLOAD_BLOCK + 12345)
    (tmp_path / "shard").write_bytes(data)
    remote = storage.upload(tmp_path / "shard", f"{gcs_bucket}/upload/shard")
    assert remote.read_bytes() == data
    assert storage.upload(tmp_path / "shard", tmp_path / "copy" / "shard").read_bytes() == data

    def copy_then_fail(source, target, length):
        target.write(source.read(length))
        raise OSError("disk read error")

    monkeypatch.setattr(shutil, "copyfileobj", copy_then_fail)
    for destination in (f"{gcs_bucket}/upload/failed", tmp_path / "failed" / "shard"):
        with pytest.raises(OSError, match="disk read error"):
            storage.upload(tmp_path / "shard", destination)
        assert not storage.as_path(destination).exists()
    assert os.listdir(tmp_path / "failed") == []


def test_local_copy_and_move_on_a_bucket(gcs_bucket, tmp_path):
    remote = storage.as_path(f"{gcs_bucket}/copy/tokenizer.json")
    storage.write_atomic(remote, '{"x": 1}')
    local = storage.local_copy(remote)
    assert os.path.basename(local) == "tokenizer.json" and json.loads(open(local).read()) == {"x": 1}
    assert storage.local_copy(remote) == local  # downloaded once per process
    assert storage.local_copy(tmp_path / "a.model") == str(tmp_path / "a.model")
    storage.write_atomic(f"{gcs_bucket}/move/src/checkpoints/2/a", "a")
    storage.write_atomic(f"{gcs_bucket}/move/src/checkpoints/4/b", "b")
    storage.move(f"{gcs_bucket}/move/src/checkpoints", f"{gcs_bucket}/move/aside/checkpoints")
    moved = storage.as_path(f"{gcs_bucket}/move/aside/checkpoints")
    assert sorted(p.name for p in moved.iterdir()) == ["2", "4"] and (moved / "4" / "b").read_text() == "b"
    assert not storage.as_path(f"{gcs_bucket}/move/src/checkpoints").exists()


def test_tensorboard_event_file_on_a_bucket(gcs_bucket, tmp_path):
    logdir = storage.as_path(f"{gcs_bucket}/tb/run")
    writer = storage.tensorboard_writer(logdir, flush_secs=3600)
    for step in range(1, 4):
        writer.add_scalar("loss", 1.0 / step, global_step=step)
    writer.close()
    (event_file,) = [p for p in logdir.iterdir() if p.name.startswith("events.out.tfevents")]
    local = tmp_path / "events"
    local.write_bytes(event_file.read_bytes())
    assert [(s, pytest.approx(v["loss"])) for s, v in read_scalar_events(local)] == \
        [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]


def test_remote_paths_are_recognised():
    assert storage.is_remote("gs://b/x") and not storage.is_remote("/tmp/x") and not storage.is_remote("runs/a")
    assert storage.absolute("gs://b/x") == storage.as_path("gs://b/x")
    assert os.path.isabs(os.fspath(storage.absolute("runs/a")))


class SwitchableProxy:
    """A TCP proxy in front of the Cloud Storage emulator that can be switched off: while
    off, open connections are cut and new ones are closed at once (a bucket unreachable)."""

    def __init__(self, upstream_port):
        import socket
        import threading

        self.upstream, self.up, self.live = upstream_port, True, []
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            self.live += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source, target):
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        for end in (source, target):
            try:
                end.close()
            except OSError:
                pass

    def switch(self, up):
        import socket

        self.up = up
        if not up:
            for end in self.live:
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.live = []

    def close(self):
        self.switch(False)
        self.server.close()


@pytest.fixture
def flaky_bucket(gcs_bucket, monkeypatch):
    """The emulator's bucket reached through a :class:`SwitchableProxy`; gcsfs's own retries
    (six per request, 1-32 s apart) do not sleep, so a test waits only for ours."""
    import asyncio
    import types

    import gcsfs
    import gcsfs.retry

    emulator = os.environ["STORAGE_EMULATOR_HOST"]
    proxy = SwitchableProxy(int(emulator.rsplit(":", 1)[1]))
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setattr(gcsfs.retry, "asyncio", types.SimpleNamespace(sleep=lambda s: asyncio.sleep(0)))
    gcsfs.GCSFileSystem.clear_instance_cache()
    yield gcs_bucket, proxy
    proxy.close()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    gcsfs.GCSFileSystem.clear_instance_cache()


def test_writes_to_a_bucket_ride_through_an_outage_and_stop_in_one_line_past_the_bound(flaky_bucket,
                                                                                      monkeypatch):
    import threading
    import time

    bucket, proxy = flaky_bucket
    path = storage.as_path(f"{bucket}/outage/metrics.jsonl")
    log = storage.AppendFile(path, flush_s=3600)
    log.append("first")
    proxy.switch(False)
    log.append("second")
    threading.Timer(2.0, proxy.switch, args=(True,)).start()  # back after 2 s
    started = time.monotonic()
    log.flush()  # retried until the bucket answers again
    assert time.monotonic() - started >= 1.5 and path.read_text() == "first\nsecond\n"
    storage.write_atomic(f"{bucket}/outage/summary.json", "{}")

    monkeypatch.setenv("VIST2_STORAGE_RETRY_S", "3")
    proxy.switch(False)  # for good
    started = time.monotonic()
    with pytest.raises(storage.StorageUnavailable, match=r"outage/summary\.json: the store kept failing for 3 s") as err:
        storage.write_atomic(f"{bucket}/outage/summary.json", '{"step": 2}')
    assert time.monotonic() - started < 20 and "\n" not in str(err.value)


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)  # the temporary file cannot be written out
    with pytest.raises(storage.StorageFull, match=r"summary\.json: no space left on device") as err:
        storage.write_atomic(tmp_path / "summary.json", "{}")
    assert "\n" not in str(err.value) and os.listdir(tmp_path) == []


def test_a_missing_bucket_is_reported_at_once_not_retried(gcs_bucket):
    import time

    started = time.monotonic()
    with pytest.raises(FileNotFoundError):
        storage.write_atomic("gs://no-such-bucket-vist2/run/config.yaml", "a: 1\n")
    assert time.monotonic() - started < 5
