"""Checkpoints verified on read (``vist2_jax.checkpointing.checkpoints``): bytes damaged
anywhere in a checkpoint (an array's data file, a JSON item, the data-iterator state) make
that checkpoint unreadable with a one-line reason naming what differs, and the previous one
is used; the array checksum does not depend on sharding."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vist2_jax.checkpointing.checkpoints import RunCheckpoints, array_checksum, host_array_checksum, one_line_reason

RENDERER = {"font": "bundled:DejaVuSansMono.ttf", "image_size": 64}


def _state(step):
    rng = np.random.default_rng(step)
    return {"params": {"decoder": {"embedding": rng.normal(size=(512, 256)).astype(np.float32)},
                       "aligner": {"bias": rng.normal(size=(64,)).astype(jnp.bfloat16)}},
            "opt_state": {"mu": {"embedding": rng.normal(size=(512, 256)).astype(np.float32)},
                          "count": np.asarray(step, np.int32)}}


def _abstract(state):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def _saved_run(tmp_path, iterator=None):
    store = RunCheckpoints(tmp_path / "run", keep=5)
    for step in (1, 2):
        store.save(step, _state(step), iterator, {"step": step}, {"kind": "t", "file": "sp.model"}, RENDERER)
        if iterator is not None:
            next(iterator)
    store.close()
    return tmp_path / "run" / "checkpoints"


def _restore(checkpoints, iterator=None, **kwargs):
    store = RunCheckpoints(checkpoints.parent, keep=5, async_save=False)
    try:
        return store.restore_latest(_abstract(_state(0)), iterator, **kwargs), store
    finally:
        store.close()


def _damage_middle(path, count=64):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(os.urandom(count))


def _largest_data_file(item_dir):
    return max((p for p in item_dir.rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def test_array_checksum_is_independent_of_sharding_and_sees_one_changed_or_swapped_value():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)), jnp.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
    reference = np.asarray(array_checksum(x))
    assert np.array_equal(np.asarray(array_checksum(sharded)), reference)
    assert not np.array_equal(np.asarray(array_checksum(x.at[17, 3].set(x[17, 3] + 1e-7))), reference)
    assert not np.array_equal(np.asarray(array_checksum(x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0]))),
                              reference)
    blocks = [np.asarray(array_checksum(x[start:start + 16], start * 32), np.uint64) for start in range(0, 64, 16)]
    assert np.array_equal(sum(blocks) % 2**32, reference)  # a leaf read in blocks of rows (export)
    for dtype in (jnp.bfloat16, jnp.int32, jnp.uint8, jnp.bool_):
        y = jnp.ones((3, 5), dtype)
        assert not np.array_equal(np.asarray(array_checksum(y)), np.asarray(array_checksum(y.at[2, 4].set(y[0, 0] == 0))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.int32, jnp.uint8, jnp.bool_])
def test_host_checksum_equals_the_device_checksum_block_by_block(dtype):
    """The exporter's NumPy checksum (streamed in blocks) gives the lanes the saver's JAX one does."""
    x = np.asarray((np.random.default_rng(1).normal(size=(37, 11)) * 100).astype(dtype))
    for first in (0, 5, 2**31 + 7):
        np.testing.assert_array_equal(host_array_checksum(x, first, block=50),
                                      np.asarray(array_checksum(jnp.asarray(x), first)))


@pytest.mark.parametrize("item", ["params", "opt_state"])
def test_bytes_damaged_in_the_middle_of_an_array_file_are_not_loaded(tmp_path, item):
    checkpoints = _saved_run(tmp_path)
    _damage_middle(_largest_data_file(checkpoints / "2" / item))
    found, store = _restore(checkpoints)
    step, state = found
    assert step == 1  # the previous checkpoint, exactly as saved
    np.testing.assert_array_equal(np.asarray(state["params"]["decoder"]["embedding"]),
                                  _state(1)["params"]["decoder"]["embedding"])
    reason = store.unreadable[2]
    assert "\n" not in reason and reason.startswith("DamagedCheckpoint: ")
    assert f"{item}/" in reason and "embedding" in reason  # names the array


def test_params_only_restores_check_the_params(tmp_path):
    checkpoints = _saved_run(tmp_path)
    _damage_middle(_largest_data_file(checkpoints / "2" / "params"))
    (step, _), store = _restore(checkpoints, params_only=True)
    assert step == 1 and "params/decoder/embedding" in store.unreadable[2]


@pytest.mark.parametrize("item", ["tokenizer", "renderer", "config"])
def test_a_damaged_json_item_is_one_line_and_the_previous_checkpoint_is_used(tmp_path, item):
    checkpoints = _saved_run(tmp_path)
    metadata = checkpoints / "2" / item / "metadata"
    metadata.write_bytes(metadata.read_bytes()[:4] + os.urandom(16) + metadata.read_bytes()[20:])
    (step, _), store = _restore(checkpoints)
    assert step == 1 and "\n" not in store.unreadable[2]
    assert store.read_json(1, item) == {"tokenizer": {"kind": "t", "file": "sp.model"}, "renderer": RENDERER,
                                        "config": {"step": 1}}[item]


def test_a_json_item_changed_into_other_valid_json_is_caught_by_its_checksum(tmp_path):
    checkpoints = _saved_run(tmp_path)
    metadata = checkpoints / "2" / "renderer" / "metadata"
    metadata.write_text(metadata.read_text().replace("64", "65"))
    (step, _), store = _restore(checkpoints)
    assert step == 1 and store.unreadable[2].startswith("DamagedCheckpoint: renderer ")
    with pytest.raises(Exception) as err:  # read directly (export reads items this way)
        RunCheckpoints(checkpoints.parent, keep=5, async_save=False).read_json(2, "renderer")
    assert one_line_reason(err.value).startswith("DamagedCheckpoint: renderer ")


def test_a_damaged_data_iterator_state_is_caught_before_grain_reads_it(tmp_path):
    import grain

    def iterator():
        return iter(grain.MapDataset.range(100).to_iter_dataset())

    checkpoints = _saved_run(tmp_path, iterator())
    (state_file,) = (checkpoints / "2" / "data").glob("process_*.json")
    state_file.write_text(state_file.read_text().replace("1", "7"))
    restored = iterator()
    (step, _), store = _restore(checkpoints, restored)
    assert step == 1 and store.unreadable[2].startswith(f"DamagedCheckpoint: data/{state_file.name} ")
    assert next(restored) == 0  # step 1 was saved before the first element was taken


RESTORE_ALL_DAMAGED = """
import logging, os, pathlib, sys
import jax, numpy as np
from vist2_jax.checkpointing.checkpoints import RunCheckpoints
logging.basicConfig(format="%(message)s")
state = {"params": {f"layer{i}": np.full((64, 64), i, np.float32) for i in range(40)}, "opt_state": {"m": np.zeros(2, np.float32)}}
store = RunCheckpoints(sys.argv[1], keep=5)
for step in (1, 2):
    store.save(step, state, None, {}, {}, {})
store.close()
store = RunCheckpoints(sys.argv[1], keep=5, async_save=False)
for folder, _, files in os.walk(store.directory):
    for path in (pathlib.Path(folder) / name for name in files if folder.endswith("2/params/d")):
        path.write_bytes(path.read_bytes()[:40] + os.urandom(64) + path.read_bytes()[104:])
device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
for attempt in range(3):
    assert store.restore_latest(abstract, params_only=True)[0] == 1
store.close()
"""


def test_a_failed_restore_prints_its_reason_and_nothing_after_it(tmp_path):
    """Orbax leaves the other reads of a failed restore running; their reports (tracebacks of
    ``Event loop is closed``) must not follow the one-line reasons."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", RESTORE_ALL_DAMAGED, str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 3 and all("step 2" in line and "is unreadable" in line for line in lines), \
        done.stderr[-2000:]


def test_only_the_reports_of_abandoned_reads_are_silenced(monkeypatch):
    import sys
    from types import SimpleNamespace

    from vist2_jax.checkpointing import checkpoints

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(unraisable.exc_value))
    monkeypatch.setattr(checkpoints, "_abandoned_reads_silenced", False)
    checkpoints._silence_abandoned_reads()
    other = ValueError("a real problem")
    sys.unraisablehook(SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None))
    sys.unraisablehook(SimpleNamespace(exc_value=other, object=None))
    assert seen == [other]


def _big_state(step):
    noise = np.random.default_rng(step).normal(size=(2, 256, 1024)).astype(np.float32)  # incompressible
    return {"params": {"w": noise[0]}, "opt_state": {"m": noise[1]}}  # 1 MiB each


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs: one 2 MiB checkpoint fits, a second does not (needs root)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_during_a_save_is_one_line_and_the_earlier_checkpoint_stays(small_disk, monkeypatch):
    """Orbax's write runs out of space (the free-space check is told there is room): one line
    naming the folder and the bytes, and step 1 restores exactly."""
    from vist2_jax import storage

    store = RunCheckpoints(small_disk / "run", keep=5)
    store.save(1, _big_state(1), None, {}, {}, {})
    store.wait()
    monkeypatch.setattr(storage, "free_bytes", lambda path: 1 << 40)
    with pytest.raises(storage.StorageFull) as err:
        store.save(2, _big_state(2), None, {}, {}, {})
        store.close()
    message = str(err.value)
    assert "\n" not in message and str(small_disk / "run" / "checkpoints") in message
    assert f"{2 * 2**20:,} bytes" in message and "latest: step 1" in message
    (step, state), _ = _restore_big(small_disk)
    assert step == 1 and np.array_equal(np.asarray(state["params"]["w"]), _big_state(1)["params"]["w"])


def test_a_save_that_cannot_fit_is_refused_before_it_starts(tmp_path, monkeypatch):
    from vist2_jax import storage

    store = RunCheckpoints(tmp_path / "run", keep=5)
    store.save(1, _big_state(1), None, {}, {}, {})
    monkeypatch.setattr(storage, "free_bytes", lambda path: 1000)
    with pytest.raises(storage.StorageFull, match=r"checkpoint step 2 \(it needs about 2,097,152 bytes, "
                                                  r"1,000 are free\).*latest: step 1"):
        store.save(2, _big_state(2), None, {}, {}, {})
    store.close()
    assert store.steps() == [1]


def _restore_big(root):
    store = RunCheckpoints(root / "run", keep=5, async_save=False)
    try:
        return store.restore_latest(_abstract(_big_state(0))), store
    finally:
        store.close()


TWO_PROCESSES_ONE_DAMAGED_ITERATOR = """
import pathlib, sys
from vist2_jax.training.distributed import initialize_from_env
initialize_from_env()
import grain, jax, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from vist2_jax.checkpointing.checkpoints import RunCheckpoints

root = sys.argv[1]
replicated = NamedSharding(Mesh(np.array(jax.devices()), ("x",)), P())
state = {"params": {"w": np.arange(8, dtype=np.float32)}, "opt_state": {"m": np.ones(8, np.float32)}}
state = jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, replicated, lambda i: x[i]), state)
iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
store = RunCheckpoints(root, keep=5)
for step in (1, 2):
    store.save(step, state, iterator, {}, {}, {})
    next(iterator)
store.close()
multihost_utils.sync_global_devices("saved")
if jax.process_index() == 1:
    damaged = pathlib.Path(root, "checkpoints", "2", "data", "process_1-of-2.json")
    damaged.write_text(damaged.read_text().replace("1", "7"))
multihost_utils.sync_global_devices("damaged")
abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state)
store = RunCheckpoints(root, keep=5, async_save=False)
restored = iter(grain.MapDataset.range(100).to_iter_dataset())
step, _ = store.restore_latest(abstract, restored)
store.close()
print(f"process {jax.process_index()}: step {step}, next {next(restored)}, unreadable {store.unreadable}", flush=True)
"""


def test_two_processes_skip_a_checkpoint_together_when_one_iterator_state_is_damaged(tmp_path):
    """Only process 1's own data-iterator file is damaged: both processes learn it before the
    restore's collectives and both use step 1 (none waits in a collective the other left)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESSES_ONE_DAMAGED_ITERATOR)
    done = subprocess.run([sys.executable, "launch/local.py", "--processes", "2", "--", sys.executable, str(script),
                           str(tmp_path / "run")], cwd=root, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "VIST2_HEARTBEAT_S": "10",
                               "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert f"process {rank}: step 1, next 0" in done.stdout, done.stdout + done.stderr[-2000:]
