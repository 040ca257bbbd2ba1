"""Orbax checkpoints of a run (``WORKDIR/checkpoints``): train state, Grain iterator state, resolved config, the
tokenizer and the renderer config, saved asynchronously with a keep-N policy. ``WORKDIR`` may be local or ``gs://`` (Orbax
writes arrays through TensorStore, the small files through ``etils.epath``).

Restore walks back from the newest step: a checkpoint that cannot be read (truncated or
corrupted files) is reported in one log line and the previous good one is used.

Orbax's array files carry no checksum of their content (bytes damaged in the middle of an
OCDBT data file load as different numbers, NaN or finite), so every checkpoint also holds a
``checksums`` item written at save time: a 64-bit checksum of each array of the params and
the optimizer state, the sha256 of each JSON item (config, tokenizer, renderer) and of each
process's data-iterator state. Restore recomputes them from what it read; a mismatch makes
that checkpoint unreadable, naming the array or item. The array checksum is a sum over
elements of a hash of (element bits, global index), modulo 2**32, in two lanes: it is
computed on the devices holding the array, needs no gather to a host, and is the same for
any sharding and any number of processes (save on a pod, load on one machine).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import logging
import sys
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from vist2_jax import storage

log = logging.getLogger(__name__)


def tokenizer_asset(tokenizer) -> dict:
    """The tokenizer as a JSON-able record (SentencePiece model bytes, base64)."""
    name = getattr(tokenizer, "path", "")
    path = storage.as_path(name) if name else None
    if path is None or not path.is_file():
        return {"kind": type(tokenizer).__name__, "file": name}
    data = path.read_bytes()
    return {"kind": type(tokenizer).__name__, "file": path.name, "sha256": hashlib.sha256(data).hexdigest(),
            "base64": base64.b64encode(data).decode()}


def write_tokenizer_asset(asset: dict, directory: storage.PathLike):
    """Recreate the tokenizer file saved by :func:`tokenizer_asset`; returns its path."""
    if "base64" not in asset:
        raise ValueError(f"checkpoint holds no tokenizer bytes (kind {asset.get('kind')}, file {asset.get('file')})")
    return storage.write_atomic(storage.as_path(directory) / asset["file"], base64.b64decode(asset["base64"]))


class DamagedCheckpoint(ValueError):
    """What a checkpoint holds differs from what was saved (its checksums)."""


_JSON_ITEMS = ("config", "tokenizer", "renderer")
_ARRAY_ITEMS = ("params", "opt_state")


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser (uint32 in, uint32 out; multiplications wrap)."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def array_checksum(x: jax.Array, first_element: int = 0) -> jax.Array:
    """Two uint32 lanes: sum over elements of ``fmix(bits * c ^ fmix(index + seed))``.

    Element bits (any dtype of 1, 2, 4 or 8 bytes) and their global row-major index enter
    each term, so a changed, moved or swapped value changes the sum (a false match has
    probability ~2**-64); the sum is order-free, so the result does not depend on sharding.
    ``first_element``: the flat index of ``x``'s first element when ``x`` is a block of rows
    of a larger array; the lanes of its blocks add up (mod 2**32) to the whole array's (a
    reader that reads a leaf in blocks, like the exporter, checks it without holding it)."""
    return _array_checksum(x, jnp.uint32(first_element % 2**32))


@jax.jit
def _array_checksum(x: jax.Array, first_element: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    if size == 8:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2]
    else:
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size])
        bits = bits.astype(jnp.uint32)
    index = jnp.full(bits.shape, first_element * jnp.uint32(2 if size == 8 else 1), jnp.uint32)
    stride = 1
    for dim in reversed(range(bits.ndim)):  # the flat index without a reshape (no resharding)
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, dim) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[dim]
    lanes = []
    for seed, factor in ((0x9E3779B9, 0xCC9E2D51), (0x7F4A7C15, 0x1B873593)):
        terms = _fmix32((bits * jnp.uint32(factor)) ^ _fmix32(index + jnp.uint32(seed)))
        lanes.append(jnp.sum(terms, dtype=jnp.uint32))
    return jnp.stack(lanes)


def host_array_checksum(x: np.ndarray, first_element: int = 0, block: int = 1 << 20) -> np.ndarray:
    """:func:`array_checksum` of a host array computed with NumPy, ``block`` elements at a
    time: the same two lanes, without starting a JAX backend or holding temporaries the size
    of ``x`` (the exporter checks each leaf it streams)."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        x = x.view(np.uint8)
    size = x.dtype.itemsize
    words = x.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[size])
    base = (first_element * (2 if size == 8 else 1)) % 2**32
    lanes = np.zeros(2, np.uint32)
    with np.errstate(over="ignore"):
        for start in range(0, words.size, block):
            bits = words[start:start + block].astype(np.uint32)
            index = (np.arange(start, start + bits.size, dtype=np.uint64) + base).astype(np.uint32)
            for lane, (seed, factor) in enumerate(((0x9E3779B9, 0xCC9E2D51), (0x7F4A7C15, 0x1B873593))):
                terms = _fmix32((bits * np.uint32(factor)) ^ _fmix32(index + np.uint32(seed)))
                lanes[lane] += np.sum(terms, dtype=np.uint32)
    return lanes


def _bytes_written_here(state: dict) -> int:
    """Bytes of params and optimizer state this process writes (one replica of each of its
    shards, as Orbax does)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves((state["params"], state["opt_state"])):
        shards = getattr(leaf, "addressable_shards", None)
        if shards is None:
            total += getattr(leaf, "nbytes", 0)
        else:
            total += sum(shard.data.nbytes for shard in shards if shard.replica_id == 0)
    return total


def checksum_hex(lanes) -> str:
    """The 16 hex digits stored in a checkpoint's ``checksums`` item for ``lanes`` (two
    uint32, e.g. the sum of :func:`array_checksum` over blocks)."""
    return "%08x%08x" % tuple(int(v) % 2**32 for v in np.asarray(lanes))


def tree_checksums(tree: Any, prefix: str) -> dict[str, str]:
    """``{"prefix/path/to/leaf": "16 hex digits"}`` for every array leaf of ``tree``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    sums = {}
    for path, leaf in leaves:
        if hasattr(leaf, "dtype") and hasattr(leaf, "shape"):
            sums[prefix + "/" + "/".join(_key_name(k) for k in path)] = lanes = array_checksum(leaf)
            devices = leaf.sharding.device_set if hasattr(leaf, "sharding") else ()
            if jax.process_count() > 1 or len(devices) > 1:
                # one cross-device reduction at a time: several queued at once deadlock the CPU
                # collectives (gloo across processes, and in-process rendezvous on a busy 2-core host)
                lanes.block_until_ready()
    return {name: checksum_hex(value) for name, value in sums.items()}


def _key_name(key) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def json_checksum(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _iterator_state_text(iterator) -> str:
    """The text Grain's checkpoint handler writes for ``iterator`` (its ``save``)."""
    state = iterator.get_state()
    return state.decode() if isinstance(state, bytes) else json.dumps(state, indent=4)


def _data_checksums(iterator) -> list[str]:
    """sha256 of each process's data-iterator state file, in process order (a collective)."""
    digest = hashlib.sha256(_iterator_state_text(iterator).encode()).digest()
    words = np.frombuffer(digest, np.uint32)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        words = np.asarray(multihost_utils.process_allgather(words)).reshape(jax.process_count(), -1)
    else:
        words = words[None]
    return [row.astype(np.uint32).tobytes().hex() for row in words]


def verify(saved: dict, name: str, actual: str) -> None:
    """Raise :class:`DamagedCheckpoint` when ``actual`` differs from the saved checksum."""
    expected = saved.get(name)
    if expected is not None and expected != actual:
        raise DamagedCheckpoint(f"{name} differs from what was saved (checksum {actual[:16]}, saved {expected[:16]})")


def _agreed(check, *args) -> None:
    """Run a check of this process's own files; with several processes all of them learn
    whether any failed (before the restore's collectives, so none is left waiting in one)."""
    try:
        check(*args)
        failure = None
    except DamagedCheckpoint as err:
        failure = err
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = np.asarray(multihost_utils.process_allgather(np.int32(failure is not None))).reshape(-1)
        if failure is None and failed.any():
            raise DamagedCheckpoint(f"the data-iterator state of process {int(np.argmax(failed))} differs from "
                                    "what was saved")
    if failure is not None:
        raise failure


def _eval_loss(metrics: dict) -> float:
    return float(metrics["eval_loss"])


class RunCheckpoints:
    """A ``CheckpointManager`` over ``WORKDIR/checkpoints`` with the items of a run."""

    def __init__(self, workdir: storage.PathLike, keep: int, async_save: bool = True, keep_best: bool = False):
        """The newest ``keep`` steps are kept; with ``keep_best`` also the one whose saved
        ``eval_loss`` (``save(metrics=...)``) is the lowest."""
        self.directory = storage.absolute(workdir) / "checkpoints"
        policies = ocp.checkpoint_managers
        policy = policies.LatestN(n=keep)
        if keep_best:
            policy = policies.AnyPreservationPolicy([policy, policies.BestN(
                get_metric_fn=_eval_loss, reverse=True, n=1, keep_checkpoints_without_metrics=False)])
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save, create=True, preservation_policy=policy,
            best_fn=_eval_loss if keep_best else None, best_mode="min")  # best_fn: Orbax writes the metrics
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.unreadable: dict[int, str] = {}  # step -> reason, filled by restore_latest
        self.json_items: dict[int, dict] = {}  # step -> {config, tokenizer, renderer} read and checked
        self._pending = (0, 0)  # (step, bytes) of the last save started

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def scored(self) -> list[tuple[int, dict]]:
        """(step, metrics saved with it) of the steps that carry a held-out loss, oldest first."""
        found = [(step, self.manager.metrics(step)) for step in self.steps()]
        return [(step, dict(metrics)) for step, metrics in found if metrics and "eval_loss" in metrics]

    def save(self, step: int, state: dict, data_iterator: Any, config: dict, tokenizer: dict,
             renderer: dict, force: bool = False, metrics: dict | None = None) -> bool:
        """Params and optimizer state are separate items so a later stage can read params alone.

        The checksums are computed here, from the arrays being saved, before Orbax's
        asynchronous write starts (which reads the same device buffers)."""
        if not force and not self.manager.should_save(step):
            return False
        checksums = {**tree_checksums(state["params"], "params"), **tree_checksums(state["opt_state"], "opt_state"),
                     **{name: json_checksum(value) for name, value in
                        (("config", config), ("tokenizer", tokenizer), ("renderer", renderer))}}
        if data_iterator is not None:
            checksums["data"] = _data_checksums(data_iterator)
        items = {"params": ocp.args.StandardSave(state["params"]),
                 "opt_state": ocp.args.StandardSave(state["opt_state"]),
                 "config": ocp.args.JsonSave(config), "tokenizer": ocp.args.JsonSave(tokenizer),
                 "renderer": ocp.args.JsonSave(renderer)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        items["checksums"] = ocp.args.JsonSave({"format": 1, "checksums": checksums})
        self.wait()  # Orbax waits for the previous save anyway; its failure is reported as its own
        need = _bytes_written_here(state)
        free = storage.free_bytes(self.directory)
        with self._reporting_storage_errors(step, need):  # an earlier asynchronous save may fail here
            if free is not None and free < need:
                raise OSError(errno.ENOSPC, "No space left on device")
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force, metrics=metrics)
        self._pending = (step, need)
        return saved

    def wait(self) -> None:
        with self._reporting_storage_errors(*self._pending):
            self.manager.wait_until_finished()

    @contextlib.contextmanager
    def _reporting_storage_errors(self, step: int, need: int):
        """A save that runs out of space (before it starts, or in Orbax's background write,
        reported at the next save or wait) is one line naming the folder and the bytes; the
        half-written step stays in Orbax's temporary folder, never taken as a checkpoint. A
        bucket that stays unreachable is one line too (``StorageUnavailable``)."""
        try:
            yield
        except Exception as err:
            if storage.is_remote(self.directory) and storage.is_transient(err):
                # TensorStore's GCS driver has already retried each request with backoff
                reason = " ".join(one_line_reason(err).split())[:200]
                raise storage.StorageUnavailable(
                    f"{self.directory}: checkpoint step {step} could not be written ({reason}); it is not "
                    "taken as a checkpoint: rerun to resume from the last complete one") from None
            if not storage.is_disk_full(err):
                raise
            free = storage.free_bytes(self.directory)
            done = [s for s in self.steps() if s < step]
            raise storage.StorageFull(
                f"{self.directory}: no space left for checkpoint step {step} (it needs about {need:,} bytes"
                + (f", {free:,} are free" if free is not None else "") + "); earlier checkpoints are intact"
                + (f" (latest: step {done[-1]})" if done else "") + ": free space and rerun to resume") from None

    def restore_latest(self, abstract_state: dict, data_iterator: Any = None,
                       params_only: bool = False, only_step: int | None = None) -> tuple[int, dict] | None:
        """(step, state) of the newest readable checkpoint; the iterator is restored in place.

        ``abstract_state`` holds ShapeDtypeStructs with shardings; with ``params_only`` only
        ``abstract_state["params"]`` is needed and read. Every array read and the JSON items
        (kept in ``self.json_items[step]``) are checked against the checkpoint's checksums.
        Unreadable steps land in ``self.unreadable`` with their reason.
        """
        _silence_abandoned_reads()
        for step in reversed(self.steps() if only_step is None else [only_step]):
            try:
                state = self._restore_verified(step, abstract_state, data_iterator, params_only)
            except Exception as err:  # orbax/tensorstore raise many kinds for damaged files
                self.unreadable[step] = one_line_reason(err)
                continue
            # Said when a readable one is found; when none is, the caller's one line lists them.
            for bad, reason in sorted(self.unreadable.items(), reverse=True):
                if bad > step:
                    log.error("checkpoint step %d at %s is unreadable (%s); using step %d",
                              bad, self.directory, reason, step)
            return step, state
        return None

    def _restore_verified(self, step: int, abstract_state: dict, data_iterator: Any, params_only: bool) -> dict:
        step_dir = self.directory / str(step)
        saved = self.saved_checksums(step)
        items = {"params": ocp.args.StandardRestore(abstract_state["params"])}
        if not params_only:
            items["opt_state"] = ocp.args.StandardRestore(abstract_state["opt_state"])
        if data_iterator is not None:
            _agreed(self._verify_data_file, step, saved)  # before Grain reads it into the iterator
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        for name in _JSON_ITEMS:
            if (step_dir / name).exists():
                items[name] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = {"params": restored["params"]}
        if not params_only:
            state["opt_state"] = restored["opt_state"]
        if saved is not None:
            for item, tree in state.items():
                if not any(name.startswith(f"{item}/") for name in saved):
                    continue  # a checkpoint saved without array checksums
                for name, actual in tree_checksums(tree, item).items():
                    if name not in saved:
                        raise DamagedCheckpoint(f"{name} has no checksum in the checkpoint")
                    verify(saved, name, actual)
        json_items = {}
        for name in _JSON_ITEMS:
            if name in items:
                json_items[name] = restored[name]
                if saved is not None:
                    verify(saved, name, json_checksum(restored[name]))
        self.json_items[step] = json_items
        return state

    def saved_checksums(self, step: int) -> dict | None:
        """The checksums written with ``step``; None for a checkpoint saved before they were."""
        if not (self.directory / str(step) / "checksums").exists():
            return None
        return self.manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))[
            "checksums"]["checksums"]

    def _verify_data_file(self, step: int, saved: dict | None) -> None:
        digests = (saved or {}).get("data")
        if not digests:
            return
        if len(digests) != jax.process_count():
            return  # Grain itself refuses a state saved by another number of processes
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = self.directory / str(step) / "data" / name
        if path.exists():
            verify({f"data/{name}": digests[jax.process_index()]}, f"data/{name}",
                   hashlib.sha256(path.read_bytes()).hexdigest())

    def read_json(self, step: int, name: str) -> dict:
        """A JSON item of ``step`` (config, tokenizer, renderer), checked against its checksum."""
        if name in self.json_items.get(step, {}):
            return self.json_items[step][name]
        value = self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]
        verify(self.saved_checksums(step) or {}, name, json_checksum(value))
        return value

    def close(self) -> None:
        self.wait()
        self.manager.close()


_abandoned_reads_silenced = False


def _silence_abandoned_reads() -> None:
    """Keep the one-line reason of a failed restore the last thing the user sees.

    When one array of a restore fails, Orbax's ``asyncio.gather`` raises at once and its
    event loop is closed with the other reads still running in TensorStore's threads. They
    end later and are reported as ignored exceptions: completion callbacks into the closed
    loop (``RuntimeError: Event loop is closed``), coroutines destroyed unfinished, and
    asyncio's "exception was never retrieved" / "Task was destroyed" log records, each with
    a traceback (hundreds of lines for a large model), some while the restore is still
    unwinding. Orbax gives no handle to cancel them and nothing waits for their results, so
    from the first restore on exactly these reports are dropped (Orbax's are the only event
    loops of the process); every other ignored exception and log record still reaches its
    handler."""
    global _abandoned_reads_silenced
    if _abandoned_reads_silenced:
        return
    _abandoned_reads_silenced = True
    previous = sys.unraisablehook

    def hook(unraisable):
        if not _is_abandoned_read(unraisable.exc_value, unraisable.object):
            previous(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(lambda record: not record.getMessage().startswith(_ABANDONED_TASK_LOGS))


_ABANDONED_TASK_LOGS = ("Task exception was never retrieved", "Future exception was never retrieved",
                        "Task was destroyed but it is pending")


def _is_abandoned_read(error: BaseException | None, where: Any) -> bool:
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True  # a TensorStore callback into the closed loop (it reports no object)
    code = getattr(where, "cr_code", None)  # a coroutine of Orbax or TensorStore destroyed unfinished
    return code is not None and any(part in code.co_filename for part in ("orbax", "tensorstore"))


def one_line_reason(err: BaseException) -> str:
    """``Type: first line of the message`` (orbax wraps some errors around bound-method reprs)."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    cause = err.__cause__ or err.__context__
    if (not text or "<bound method" in text) and cause is not None:
        return one_line_reason(cause)
    return f"{type(err).__name__}: {text[:200]}"
