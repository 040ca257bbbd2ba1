"""Where metrics go: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard event
files (written directly, no TensorFlow needed), and a progress line on the console."""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Mapping


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire) + payload


def _length_delimited(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def encode_event(wall_time: float, step: int, scalars: Mapping[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    """A serialized ``tensorflow.Event`` protobuf: wall_time=1, step=2, file_version=3,
    summary=5 (Summary.value=1: Value.tag=1, Value.simple_value=2)."""
    event = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        event += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(_length_delimited(1, _length_delimited(1, tag.encode())
                                            + _field(2, 5, struct.pack("<f", float(value))))
                          for tag, value in scalars.items())
        event += _length_delimited(5, values)
    return event


class TensorBoardWriter:
    """Appends scalar summaries to an ``events.out.tfevents.*`` file in TFRecord framing."""

    def __init__(self, logdir: str | Path):
        Path(logdir).mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = Path(logdir) / name
        self._file = self.path.open("ab")
        self._write(encode_event(time.time(), 0, file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", _masked_crc(header)) + record
                         + struct.pack("<I", _masked_crc(record)))
        self._file.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._write(encode_event(time.time(), step, scalars=values))

    def close(self) -> None:
        self._file.close()


def read_events(path: str | Path) -> list[tuple[int, dict[str, float]]]:
    """Decode (step, scalars) from an event file written above; checks every CRC."""
    data = Path(path).read_bytes()
    out, offset = [], 0
    while offset < len(data):
        header = data[offset:offset + 8]
        (length,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[offset + 8:offset + 12])[0] != _masked_crc(header):
            raise ValueError(f"{path}: bad length CRC at byte {offset}")
        record = data[offset + 12:offset + 12 + length]
        if struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])[0] != _masked_crc(record):
            raise ValueError(f"{path}: bad data CRC at byte {offset}")
        out.append(_decode_event(record))
        offset += 16 + length
    return out


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def _fields(data: bytes):
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _read_varint(data, at)
        elif wire == 1:
            value, at = data[at:at + 8], at + 8
        elif wire == 5:
            value, at = data[at:at + 4], at + 4
        else:
            size, at = _read_varint(data, at)
            value, at = data[at:at + size], at + size
        yield number, value


def _decode_event(record: bytes) -> tuple[int, dict[str, float]]:
    step, scalars = 0, {}
    for number, value in _fields(record):
        if number == 2:
            step = value
        elif number == 5:
            for _, item in _fields(value):
                parts = dict(_fields(item))
                scalars[parts[1].decode()] = struct.unpack("<f", parts[2])[0]
    return step, scalars


class MetricsLogger:
    """metrics.jsonl + TensorBoard + a console progress line, for host 0 only."""

    def __init__(self, workdir: str | Path, total_steps: int, enabled: bool = True,
                 progress: bool = True, label: str = "train"):
        self.enabled, self.total, self.label = enabled, total_steps, label
        self.progress = progress
        self.start = time.time()
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.jsonl = workdir / "metrics.jsonl"
        self.tensorboard = TensorBoardWriter(workdir / "tensorboard")

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (a resumed run recomputes them)."""
        if not self.enabled or not self.jsonl.exists():
            return
        kept = [line for line in self.jsonl.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.jsonl.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, record: Mapping[str, float | int | str]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **record}
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.tensorboard.scalars(step, {k: float(v) for k, v in record.items()
                                        if isinstance(v, (int, float)) and k != "step"})
        if self.progress:
            self._progress(step, record)

    def _progress(self, step: int, record: Mapping) -> None:
        done = step / max(self.total, 1)
        bar = "#" * int(24 * done) + "-" * (24 - int(24 * done))
        elapsed = time.time() - self.start
        eta = elapsed / max(done, 1e-9) - elapsed if done > 0 else float("nan")
        parts = [f"{self.label} [{bar}] {step}/{self.total}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("eval_loss", "eval {:.4f}"),
                         ("text_tokens_per_s", "{:.0f} text tok/s"), ("step_time_s", "{:.3f} s/step")):
            if key in record:
                parts.append(fmt.format(record[key]))
        parts.append(f"eta {eta:.0f}s")
        print("  ".join(parts), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()
