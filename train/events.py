"""TensorBoard scalar event files, written directly.

tensorboardX imports torch when it is installed (4-8 s and a few hundred MB of memory at every training
start) and `tensorboard` is not a dependency, yet scalars need only two small records: an event file is a
TFRecord stream (length, masked CRC-32C of the length, bytes, masked CRC-32C of the bytes) of `Event`
protos, and a scalar is `Event{wall_time, step, summary{value{tag, simple_value}}}`. The test reads the
files back with TensorFlow's own reader.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        out.append(bits | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event(
    wall_time: float,
    step: int,
    *,
    file_version: str | None = None,
    tag: str | None = None,
    value: float | None = None,
    session_start: bool = False,
) -> bytes:
    """An `Event` proto: wall_time = 1 (double), step = 2 (int64), file_version = 3, summary = 5,
    session_log = 7 (SessionLog{status = 1}, START = 1)."""
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if session_start:
        out += _length_delimited(7, b"\x08\x01")
    if tag is not None:  # Summary.value = 1 -> Value{tag = 1, simple_value = 2 (float)}
        summary_value = _length_delimited(1, tag.encode()) + b"\x15" + struct.pack("<f", value)
        out += _length_delimited(5, _length_delimited(1, summary_value))
    return out


class ScalarWriter:
    """Appends scalars to a new `events.out.tfevents.*` file in `logdir` (one file per writer).

    `purge_step` (a resumed run's first step) starts the file with a SessionLog START at that step, which
    tells TensorBoard to drop the earlier files' events from that step on (logged after the checkpoint the
    run resumed from), as tensorboardX's `purge_step` does.
    """

    def __init__(self, logdir: str | os.PathLike, purge_step: int | None = None):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = logdir / f"events.out.tfevents.{now:.6f}.{socket.gethostname()}.{os.getpid()}"
        self.handle = open(self.path, "ab")  # noqa: SIM115 (open for the writer's lifetime; close())
        self._write(_event(now, purge_step or 0, file_version="brain.Event:2"))
        if purge_step is not None:
            self._write(_event(now, purge_step, session_start=True))

    def _write(self, record: bytes) -> None:
        length = struct.pack("<Q", len(record))
        self.handle.write(
            length + struct.pack("<I", _masked_crc(length)) + record + struct.pack("<I", _masked_crc(record))
        )

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._write(_event(time.time(), step, tag=tag, value=float(value)))

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()
