"""Length-prefixed frames on a byte stream, with a hard cap checked before reading.

A frame is a 4-byte big-endian length followed by that many bytes of message.
We read with our own loop: libp2p's varint reader gives up after 100 partial reads.
"""

from __future__ import annotations

import struct
from typing import Protocol

import trio

from .codec import Message, decode_message, encode_message
from .errors import ERROR_CODES, INTERNAL, LimitExceededError, ProtocolError, RemoteError
from .limits import DEFAULT_LIMITS, Limits

_LENGTH = struct.Struct("!I")
_WRITE_CHUNK = 1024 * 1024  # keeps each yamux write well inside one window


class ByteStream(Protocol):
    async def read(self, n: int | None = -1) -> bytes: ...
    async def write(self, data: bytes) -> None: ...


class ClosableStream(Protocol):
    async def close(self) -> None: ...


async def close_quietly(stream: ClosableStream | None) -> None:
    """Close a stream, waiting at most a second; a stream already dead is fine."""
    if stream is None:
        return
    with trio.move_on_after(1):
        try:
            await stream.close()
        except Exception:  # noqa: S110 - closing a dead stream is fine
            pass


class StreamClosed(ProtocolError):
    """The peer closed the stream (cleanly, between frames)."""


async def read_exact(stream: ByteStream, n: int) -> bytes:
    chunks: list[bytes] = []
    remaining = n
    while remaining > 0:
        try:
            chunk = await stream.read(remaining)
        except Exception as exc:  # libp2p raises several EOF/reset types
            if remaining == n and not chunks:
                raise StreamClosed(f"stream closed: {type(exc).__name__}") from None
            raise ProtocolError(f"stream ended inside a frame: {type(exc).__name__}") from None
        if not chunk:
            if remaining == n and not chunks:
                raise StreamClosed("stream closed")
            raise ProtocolError("stream ended inside a frame")
        if len(chunk) > remaining:
            raise ProtocolError("stream returned more bytes than asked for")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


async def read_frame(stream: ByteStream, limits: Limits = DEFAULT_LIMITS) -> bytes:
    (length,) = _LENGTH.unpack(await read_exact(stream, _LENGTH.size))
    if length > limits.max_frame_bytes:
        raise LimitExceededError(f"frame of {length} bytes exceeds {limits.max_frame_bytes}")
    if not length:
        return b""
    try:
        return await read_exact(stream, length)
    except StreamClosed:  # EOF right after the length prefix is still inside a frame
        raise ProtocolError("stream ended inside a frame") from None


async def write_frame(stream: ByteStream, payload: bytes) -> None:
    if len(payload) >= 2**32:
        raise LimitExceededError("frame too large for its length field")
    await stream.write(_LENGTH.pack(len(payload)) + payload[:_WRITE_CHUNK])
    for offset in range(_WRITE_CHUNK, len(payload), _WRITE_CHUNK):
        await stream.write(payload[offset : offset + _WRITE_CHUNK])


def error_message(code: str, text: str) -> Message:
    return Message(meta={"error": code, "message": text[:2000]})


def raise_if_error(message: Message) -> Message:
    """Turn an error frame from a server into RemoteError."""
    code = message.meta.get("error")
    if code is None:
        return message
    if code not in ERROR_CODES:
        code = INTERNAL
    raise RemoteError(code, message.meta.get("message", "")[:2000])


async def send_message(
    stream: ByteStream, message: Message, limits: Limits = DEFAULT_LIMITS
) -> bytes:
    """Encode and send; returns the exact bytes sent (what request digests cover)."""
    payload = encode_message(message, limits)
    await write_frame(stream, payload)
    return payload


async def receive_message(
    stream: ByteStream, limits: Limits = DEFAULT_LIMITS
) -> tuple[Message, bytes]:
    payload = await read_frame(stream, limits)
    return decode_message(payload, limits), payload
