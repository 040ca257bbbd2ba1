"""Prepared sources: random-access records on disk, tokenized when a row needs them.

``vist2 data prepare`` (``data_pipelines/prepare.py``) writes a folder (local or ``gs://``)::

    manifest.json         written last: format, counts, what was prepared and how, and the
                          byte count and sha256 of every index and shard file
    records.npy           int64 [N, 4]: shard, byte offset, byte length, CRC-32 of each good record
    doc.npy, chat.npy     int64 record numbers usable as documents (olm, ocr) / chats (sft)
    caption.npy           int64 [M, 2]: (record number, caption line) per caption (stage caption)
    bad_records.jsonl     every bad record with its file:line and the problem
    shards/NNNNN.bin      the records: a JSON head {location, byte lengths}, NUL, text, prompt,
                          image bytes, int32 token ids (when prepared with a tokenizer)

``PreparedSamples`` is a ``Sample`` sequence over one of the indexes: its length comes from
the manifest, index arrays are memory-mapped and records are read with ``pread``, so
opening costs the same for 200 MB or 2 TB, and a Grain worker reads only the records
its rows use. It pickles as its path (workers reopen it). Records are tokenized when a
row reads them, unless the folder was prepared with the run's tokenizer (same sha256):
then the stored ids are used, since tokenizing a whole document on every read
(~2 M chars/s) would cost more than building the row.

Damage is never read as data: every record read is checked against its CRC-32 (a damaged
or truncated shard raises :class:`DamagedRecord`, naming the shard file and the record,
which the row makers skip and count or stop on, as ``data.bad_input`` says); the index
files are checked against their size and sha256 when the folder is opened (once per host;
Grain workers inherit the result), a damaged one being a one-line ``BadInput``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import zlib
from collections import OrderedDict

import numpy as np
from etils import epath

from data_pipelines.records import BadInput, Record, Sample, caption_lines
from vist2_jax import storage

FORMAT = 2  # 2: records carry a CRC-32, the manifest the sha256 of every file
MANIFEST, PLAN, BAD_RECORDS = "manifest.json", "plan.json", "bad_records.jsonl"
DOC, CHAT, CAPTION = 0, 1, 2  # record kinds
INDEX_OF_STAGE = {"caption": "caption", "sft": "chat"}  # other stages read "doc"
OPEN_SHARDS = 64


class DamagedRecord(BadInput):
    """A stored record whose bytes differ from what ``vist2 data prepare`` wrote."""

    def __init__(self, location: str, problem: str):
        super().__init__(f"{location}: {problem}")
        self.location, self.problem = location, problem


def record_checksum(payload: bytes) -> int:
    return zlib.crc32(payload)


def encode_record(record: Record, image: bytes = b"", tokens: list[list[int]] = ()) -> bytes:
    """One stored record: a small JSON head (location and byte lengths), NUL, then the text,
    prompt and image bytes and the int32 ids of ``tokens`` (text and prompt, or each
    caption line), so a read parses only the head."""
    text, prompt = record.text.encode("utf-8"), (record.prompt or "").encode("utf-8")
    head = json.dumps({"location": record.location, "text": len(text), "prompt": len(prompt),
                       "chat": record.prompt is not None, "image": len(image), "tokens": [len(t) for t in tokens]},
                      ensure_ascii=False)
    ids = np.concatenate([np.asarray(t, np.int32) for t in tokens]) if tokens else np.zeros(0, np.int32)
    return b"".join([head.encode("utf-8"), b"\0", text, prompt, image, ids.astype("<i4").tobytes()])


def decode_record(payload: bytes) -> tuple[Record, list[np.ndarray]]:
    """The record and its stored token arrays (empty when prepared without a tokenizer)."""
    end = payload.index(b"\0")  # JSON escapes NUL, so the first one ends the head
    head = json.loads(payload[:end])
    prompt_at = end + 1 + head["text"]
    image_at = prompt_at + head["prompt"]
    ids_at = image_at + head["image"]
    ids = np.frombuffer(payload, "<i4", offset=ids_at).astype(np.int32)
    tokens, start = [], 0
    for length in head["tokens"]:
        tokens.append(ids[start:start + length])
        start += length
    record = Record(payload[end + 1:prompt_at].decode("utf-8"),
                    payload[prompt_at:image_at].decode("utf-8") if head["chat"] else None,
                    head["location"], image=payload[image_at:ids_at] or None)
    return record, tokens


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's file: which ids a prepared folder stores."""
    return hashlib.sha256(storage.as_path(tokenizer.path).read_bytes()).hexdigest()


def load_array(path: epath.Path, expected: dict | None = None) -> np.ndarray:
    """An index array: memory-mapped when local, read whole from object stores. With
    ``expected`` (its manifest entry) a file of another size is a one-line ``BadInput``."""
    try:
        if expected is not None and path.stat().length != expected["bytes"]:
            raise ValueError(f"{path.stat().length} bytes, {expected['bytes']} were written")
        if not storage.is_remote(path):
            return np.load(str(path), mmap_mode="r")
        return np.load(io.BytesIO(path.read_bytes()))
    except (ValueError, OSError, EOFError) as err:
        raise BadInput(f"{path}: damaged index file ({err}); prepare the folder again") from None


def verify_file(path: epath.Path, expected: dict) -> None:
    """``path`` has the size and sha256 the manifest gives, else a one-line ``BadInput``."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while block := f.read(16 * 2**20):
            digest.update(block)
            size += len(block)
    if size != expected["bytes"] or digest.hexdigest() != expected["sha256"]:
        raise BadInput(f"{path}: damaged index file ({size} bytes, sha256 {digest.hexdigest()[:16]}...; "
                       f"{expected['bytes']} bytes, {expected['sha256'][:16]}... were written); "
                       "prepare the folder again")


def read_manifest(root) -> dict | None:
    """The manifest of a prepared folder; None when ``root`` is not one. BadInput when the
    folder holds an unfinished preparation."""
    root = storage.as_path(root)
    if (root / MANIFEST).exists():
        manifest = json.loads((root / MANIFEST).read_text())
        if manifest.get("format") != FORMAT:
            raise BadInput(f"data.source: {root} was prepared in format {manifest.get('format')}, "
                           f"this code reads {FORMAT}; prepare it again")
        return manifest
    if (root / PLAN).exists():
        raise BadInput(f"data.source: {root} is an unfinished preparation; run `vist2 data prepare` "
                       "with the same arguments again to finish it")
    return None


def is_prepared(source: str) -> bool:
    if source == "embedded" or source.startswith("tfds:"):
        return False
    return read_manifest(source) is not None


class _Shards:
    """Byte ranges of shard files (``os.pread`` on local files, seek + read elsewhere), under
    a lock since Grain's read-ahead threads share them; at most ``OPEN_SHARDS`` stay open."""

    def __init__(self, root: str):
        self.root, self.open_files, self.lock = storage.as_path(root), OrderedDict(), threading.Lock()

    def path(self, shard: int) -> epath.Path:
        return self.root / "shards" / f"{shard:05d}.bin"

    def read(self, shard: int, offset: int, length: int) -> bytes:
        with self.lock:
            handle = self.open_files.get(shard)
            if handle is None:
                path = self.path(shard)
                handle = os.open(str(path), os.O_RDONLY) if not storage.is_remote(path) else path.open("rb")
                self.open_files[shard] = handle
                if len(self.open_files) > OPEN_SHARDS:
                    self._close(self.open_files.popitem(last=False)[1])
            else:
                self.open_files.move_to_end(shard)
            if isinstance(handle, int):
                return os.pread(handle, length, offset)
            handle.seek(offset)
            return handle.read(length)

    @staticmethod
    def _close(handle) -> None:
        os.close(handle) if isinstance(handle, int) else handle.close()

    def __del__(self):
        for handle in self.open_files.values():
            self._close(handle)


class PreparedSamples:
    """The ``Sample``s of a prepared folder for one stage, read and tokenized on access."""

    def __init__(self, root: str, stage: str, tokenizer):
        self.root, self.stage, self.tokenizer = str(root), stage, tokenizer
        self.manifest = read_manifest(root)
        if self.manifest is None:
            raise BadInput(f"data.source: {root} is not a prepared folder (no {MANIFEST})")
        self.index_name = INDEX_OF_STAGE.get(stage, "doc")
        self.length = int(self.manifest["counts"][self.index_name])
        stored = self.manifest.get("tokenizer_sha256")
        self.pretokenized = bool(stored) and tokenizer is not None and stored == tokenizer_fingerprint(tokenizer)
        self._tables = None
        self.files = self.manifest.get("files", {})
        root = storage.as_path(self.root)
        for name in ("records.npy", f"{self.index_name}.npy"):  # once per host; workers get the result
            verify_file(root / name, self.files[name])

    def __getstate__(self):
        return {**self.__dict__, "_tables": None}

    def __len__(self) -> int:
        return self.length

    def _open(self):
        if self._tables is None:
            root = storage.as_path(self.root)
            self._tables = tuple(load_array(root / name, self.files[name])
                                 for name in ("records.npy", f"{self.index_name}.npy")) + (_Shards(self.root),)
        return self._tables

    def record(self, number: int) -> Record:
        """Good record ``number`` (0-based, in preparation order)."""
        return self._read(number)[0]

    def _read(self, number: int) -> tuple[Record, list[np.ndarray]]:
        records, _, shards = self._open()
        shard, offset, length, checksum = (int(v) for v in records[number])
        payload = shards.read(shard, offset, length)
        if len(payload) != length or record_checksum(payload) != checksum:
            problem = ("truncated" if len(payload) != length else "checksum differs") + \
                f" (record {number}, bytes {offset}-{offset + length}); prepare the folder again"
            raise DamagedRecord(str(shards.path(shard)), f"damaged shard: {problem}")
        return decode_record(payload)

    def __getitem__(self, i) -> Sample:
        i = int(i)
        if not 0 <= i < self.length:
            raise IndexError(f"sample {i} of {self.length}")
        _, index, _ = self._open()
        if self.index_name == "caption":
            number, line = (int(v) for v in index[i])
            record, stored = self._read(number)
            tokens = stored[line] if self.pretokenized else self._encode(caption_lines(record.text)[line])
            return Sample(tokens, None, record.location, record.image)
        record, stored = self._read(int(index[i]))
        if self.pretokenized:
            return Sample(stored[0], stored[1] if record.prompt else None, record.location)
        prompt = self._encode(record.prompt) if record.prompt else None
        return Sample(self._encode(record.text), prompt, record.location)

    def location(self, i: int) -> str:
        """Sample ``i``'s location without tokenizing it (what the held-out split hashes)."""
        _, index, _ = self._open()
        number = index[int(i)]
        return self._read(int(number[0] if self.index_name == "caption" else number))[0].location

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text), np.int32)

    def counters(self) -> dict:
        """Source counters as ``load_samples`` reports them: records read, skipped in all
        and by kind (bad at preparation, or not usable by this stage)."""
        counts = self.manifest["counts"]
        out = {"records": counts["read"], "skipped": counts["bad"], **counts["bad_kinds"]}
        usable = counts["caption_records"] if self.index_name == "caption" else counts[self.index_name]
        unusable = counts["good"] - usable
        if unusable:
            out["skipped"] += unusable
            out[f"skipped:not usable for stage {self.stage}"] = unusable
        return out

    def first_bad(self) -> str:
        """``location: problem`` of the first bad record ('' when there is none)."""
        path = storage.as_path(self.root) / BAD_RECORDS
        if not path.exists():
            return ""
        with path.open("r") as f:
            line = f.readline()
        if not line:
            return ""
        bad = json.loads(line)
        return f"{bad['location']}: {bad['problem']}"
