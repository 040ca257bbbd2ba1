"""Read the parameter arrays of an Orbax checkpoint item one at a time, without restoring
the tree.

``RunCheckpoints`` saves ``params`` with Orbax's PyTree handler: one zarr array per leaf,
named by its dotted key path (``params.decoder.embedding``), inside an OCDBT key-value
store (or plain files when OCDBT is off), as ``_METADATA`` records. Opening an array with
TensorStore reads only its metadata; a read fetches (and decompresses) only the chunks it
touches, so an exporter holds one leaf, or one block of layers of a stacked leaf, at a time.

The item may be local (TensorStore's ``file`` driver) or on Cloud Storage (``gs://``: its
``gcs`` driver, the kvstore Orbax itself writes there with); ``_METADATA`` is read through
the path layer (``vist2_jax.storage``).

Given the checkpoint's saved ``checksums``, every leaf read is checked against its array
checksum (for a stacked leaf, the sum of its blocks' checksums once the last block is read),
so a damaged data file is an :class:`UnreadableCheckpoint` naming the array rather than
silently exported weights.
"""

from __future__ import annotations

import json
from typing import Iterator
from urllib import parse

import numpy as np
import tensorstore as ts

from vist2_jax import storage
from vist2_jax.checkpointing.checkpoints import (DamagedCheckpoint, checksum_hex, host_array_checksum,
                                                 one_line_reason, verify)


class UnreadableCheckpoint(Exception):
    """Stored data that cannot be read (missing, truncated or corrupted files)."""


class OrbaxParams:
    """The arrays of one PyTree checkpoint item (e.g. ``checkpoints/<step>/params``).

    ``checksums``: the step's saved checksums (``RunCheckpoints.saved_checksums``), keyed
    ``<item>/<key>/<path>``; None (a checkpoint saved before checksums) reads unchecked."""

    def __init__(self, directory: storage.PathLike, checksums: dict | None = None):
        self.directory = storage.absolute(directory)
        self.item = self.directory.name
        self.checksums = checksums
        self._base = _kvstore(self.directory)
        meta_file = self.directory / "_METADATA"
        if not meta_file.is_file():
            raise UnreadableCheckpoint(f"{self.directory}: no _METADATA (not an Orbax PyTree item)")
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError) as err:
            raise UnreadableCheckpoint(f"{meta_file}: {err}") from None
        self.use_ocdbt = bool(meta.get("use_ocdbt", True))
        self.driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        self.paths = {}
        for record in meta["tree_metadata"].values():
            keys = tuple(str(k["key"]) for k in record["key_metadata"])
            self.paths[keys] = ".".join(keys)
        # no TensorStore cache: a chunk read once is not kept in memory afterwards
        self._context = ts.Context({"cache_pool": {"total_bytes_limit": 0}})
        self._open: dict[tuple[str, ...], ts.TensorStore] = {}

    def _spec(self, name: str) -> dict:
        if self.use_ocdbt:
            kvstore = {"driver": "ocdbt", "base": self._base, "path": name}
        else:
            kvstore = {**self._base, "path": self._base["path"] + name}
        return {"driver": self.driver, "kvstore": kvstore}

    def array(self, path: tuple[str, ...]) -> ts.TensorStore:
        """The opened (metadata-only) array of a leaf; KeyError for a path not saved."""
        if path not in self._open:
            if path not in self.paths:
                raise KeyError(f"{self.directory}: no parameter {'/'.join(path)}")
            self._open[path] = self._result(ts.open(self._spec(self.paths[path]), open=True, read=True,
                                                    context=self._context), path)
        return self._open[path]

    def _result(self, future, path):
        try:
            return future.result()
        except ValueError as err:  # TensorStore reports missing and damaged data as ValueError
            raise UnreadableCheckpoint(f"{self.directory}: {'/'.join(path)}: {one_line_reason(err)}") from None

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self.array(path).shape)

    def dtype(self, path: tuple[str, ...]) -> np.dtype:
        return np.dtype(self.array(path).dtype.numpy_dtype)

    def nbytes(self, path: tuple[str, ...]) -> int:
        return int(np.prod(self.shape(path))) * self.dtype(path).itemsize

    def read(self, path: tuple[str, ...]) -> np.ndarray:
        """The whole leaf, checked against its saved checksum."""
        value = self._result(self.array(path).read(), path)
        self._verify(path, host_array_checksum(value))
        return value

    def _verify(self, path: tuple[str, ...], lanes: np.ndarray) -> None:
        if self.checksums is None:
            return
        name = "/".join((self.item, *path))
        if name not in self.checksums:
            raise UnreadableCheckpoint(f"{self.directory}: {name} has no checksum in the checkpoint")
        try:
            verify(self.checksums, name, checksum_hex(lanes))
        except DamagedCheckpoint as err:
            raise UnreadableCheckpoint(f"{self.directory}: {err}") from None

    def layer_blocks(self, path: tuple[str, ...]) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_layer, block)`` over a stacked leaf, a block being as many layers as one
        stored chunk spans (the smallest read that decompresses no chunk twice)."""
        array = self.array(path)
        layers = array.shape[0]
        step = max(1, min(layers, int(array.chunk_layout.read_chunk.shape[0] or layers)))
        per_layer = int(np.prod(array.shape[1:], dtype=np.int64))
        lanes = np.zeros(2, np.uint64)
        for start in range(0, layers, step):
            block = self._result(array[start:start + step].read(), path)
            lanes = (lanes + host_array_checksum(block, start * per_layer).astype(np.uint64)) % 2**32
            if start + step >= layers:  # checked before the last block is handed out
                self._verify(path, lanes)
            yield start, block


def _kvstore(directory) -> dict:
    """The TensorStore kvstore of a checkpoint item folder, its path ending in ``/``: the
    ``file`` driver for a local folder, the ``gcs`` driver (bucket + object prefix, as Orbax's
    ``gcs_utils.get_kvstore_for_gcs`` builds it) for ``gs://bucket/prefix``."""
    text = str(directory).rstrip("/")
    if not storage.is_remote(text):
        return {"driver": "file", "path": text + "/"}
    url = parse.urlparse(text)
    if url.scheme != "gs" or not url.netloc:
        raise UnreadableCheckpoint(f"{text}: only local folders and gs://bucket/... checkpoints can be read")
    return {"driver": "gcs", "bucket": url.netloc, "path": url.path.lstrip("/") + "/"}
