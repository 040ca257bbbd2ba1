"""Write safetensors shards tensor by tensor: the header is written first from a plan of
names, shapes and dtypes, then each tensor's bytes as soon as it is produced, so a writer
never holds more than the tensor in hand. Above ``max_shard_bytes`` the tensors go into
``model-0000k-of-0000n.safetensors`` files listed by ``model.safetensors.index.json``
(the layout ``transformers`` ``from_pretrained`` reads)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Sequence

import ml_dtypes
import numpy as np

DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
               np.dtype(np.float16): "F16"}


class ShardedWriter:
    """``plan``: ``(name, shape, dtype)`` in the order ``write`` will be called."""

    def __init__(self, directory: str | Path, plan: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                 max_shard_bytes: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.plan = [(name, tuple(int(s) for s in shape), np.dtype(dtype)) for name, shape, dtype in plan]
        shards, size = [[]], 0
        for entry in self.plan:
            nbytes = int(np.prod(entry[1])) * entry[2].itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        count = len(shards)
        self.files = (["model.safetensors"] if count == 1 else
                      [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self.shards = shards
        self.total_bytes = sum(int(np.prod(s)) * d.itemsize for _, s, d in self.plan)
        self._shard, self._index, self._file = 0, 0, None

    def _open_shard(self) -> None:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in self.shards[self._shard]:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._file = (self.directory / self.files[self._shard]).open("wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)

    def write(self, name: str, array: np.ndarray) -> None:
        """The next planned tensor; its name, shape and dtype must match the plan."""
        want = self.shards[self._shard][self._index]
        if (name, tuple(array.shape), array.dtype) != want:
            raise ValueError(f"safetensors writer expected {want}, got {(name, array.shape, array.dtype)}")
        if self._file is None:
            self._open_shard()
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._index += 1
        if self._index == len(self.shards[self._shard]):
            self._file.close()
            self._file, self._index = None, 0
            self._shard += 1

    def close(self) -> None:
        """Check every planned tensor was written; write the index of a sharded checkpoint."""
        if self._shard != len(self.shards):
            raise RuntimeError(f"safetensors writer closed after {self._shard} of {len(self.shards)} shards")
        if len(self.files) > 1:
            weight_map = {name: file for file, shard in zip(self.files, self.shards) for name, _, _ in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
