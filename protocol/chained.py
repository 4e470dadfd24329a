"""Chained inference steps: the frames a client and servers exchange to pass a step
from server to server instead of back through the client (DESIGN-NOTES, "Chaining").

A *chain frame* goes from the client to one hop, on that hop's own session stream:

    b"TSCHAIN1" || u32 big-endian header length || header JSON || request bytes

The header says where the hop's input comes from and where its output goes:

    {"wait": seconds the hop waits for its input,
     "upstream": null | {"peer", "session_id", "step"},      # the previous hop's session
     "next": null | {"peer", "addrs", "session_id", "step"}} # the next hop's session

With no upstream (the first hop) the request bytes are the hop's whole step request.
Otherwise they are a *template*: the step request the client would send, with zeros
where hidden_states go. The hop splices the previous hop's output into the template
(`splice_hidden`), so the bytes it signs are exactly what the client computes from the
same template and the output it checked: request digests, chain links and evidence are
those of a client-driven step.

A *forwarded input* goes from a hop to the next on `/trustswarm/chain/1`: the previous
hop's signed answer (its statement and output tensor, as it sent them to the client)
plus the session it is for. The receiver checks the statement names the upstream the
client named; a forwarder cannot pass on anything but an output it signed.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch

from .codec import Message, decode_message, dtype_name
from .digests import tensors_digest
from .errors import LimitExceededError, ProtocolError, SignatureError
from .identity import parse_peer_id
from .limits import DEFAULT_LIMITS, Limits
from .sessions import check_client_part, check_server_nonce
from .statement import SignedStatement

MAGIC = b"TSCHAIN1"
_LENGTH = struct.Struct(">I")
MAX_HEADER_BYTES = 16 * 1024
MAX_WAIT = 10.0  # seconds a hop may be asked to wait for its input
MAX_ADDRS = 8
MAX_ADDR_CHARS = 256
MAX_PEER_ID_CHARS = 128
MAX_STEP = 2**31
MAX_CHAIN_TOKENS = 64  # a chained step's tokens (prefills go hop by hop)
# The longest a hop spends passing one output on (dial, announcement check, send and
# acknowledgement). Its session reads the client's next frame only after that, so a
# client allows this much more for a chained answer: a next hop that stalls cannot make
# an honest hop look slow.
MAX_FORWARD_SECONDS = 10.0
HIDDEN = "hidden_states"
# The error text a hop answers when its input did not arrive in time; its session is
# untouched, so the client sends the step itself on the same stream.
INPUT_MISSING = "chained input did not arrive"
TO_SESSION = "to_session"  # forwarded input: the receiving hop's session id
_FORWARDED_META = frozenset({"statement", "signature", TO_SESSION})


@dataclass(frozen=True)
class Upstream:
    """The previous hop's session: the only source a hop takes its input from."""

    peer: str
    session_id: str
    step: int


@dataclass(frozen=True)
class Downstream:
    """The next hop's session, and where to reach it."""

    peer: str
    addrs: tuple[str, ...]
    session_id: str
    step: int


@dataclass(frozen=True)
class Expected:
    """What a waiting hop takes as its input: the named upstream's output, for the
    blocks ending at `start` (where the session begins), of the template's shape."""

    upstream: Upstream
    start: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ChainFrame:
    wait: float
    upstream: Upstream | None
    next: Downstream | None
    request: bytes  # the whole request (no upstream) or the template
    shape: tuple[int, ...] = ()  # a parsed template's hidden_states shape


def is_chain_frame(payload: bytes) -> bool:
    """Whether a session-stream frame is a chain frame (a step request is a
    safetensors blob, whose first 8 bytes are a little-endian header length that
    these bytes would make far too large to decode)."""
    return payload[: len(MAGIC)] == MAGIC


def encode_chain_frame(frame: ChainFrame) -> bytes:
    header: dict[str, object] = {
        "wait": frame.wait,
        "upstream": None if frame.upstream is None else vars(frame.upstream),
        "next": None
        if frame.next is None
        else {**vars(frame.next), "addrs": list(frame.next.addrs)},
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise LimitExceededError("chain frame header too large")
    _check_header(header)  # never send what a hop has to refuse
    return MAGIC + _LENGTH.pack(len(raw)) + raw + frame.request


def _check_header(header: object) -> tuple[float, Upstream | None, Downstream | None]:
    if not isinstance(header, dict) or set(header) != {"wait", "upstream", "next"}:
        raise ProtocolError("chain frame header must hold exactly wait, upstream and next")
    wait = header["wait"]
    if type(wait) not in (int, float) or not math.isfinite(wait) or not 0 < wait <= MAX_WAIT:
        raise ProtocolError(f"chain frame wait must be a number in (0, {MAX_WAIT:g}] seconds")
    upstream = None if header["upstream"] is None else _upstream(header["upstream"])
    downstream = None if header["next"] is None else _downstream(header["next"])
    return float(wait), upstream, downstream


def parse_chain_frame(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> ChainFrame:
    """Decode and validate a chain frame; its request must decode under `limits` and,
    as a template, hold float32 hidden_states. Raises ProtocolError (LimitExceededError)."""
    if not is_chain_frame(payload):
        raise ProtocolError("not a chain frame")
    head = len(MAGIC) + _LENGTH.size
    if len(payload) < head:
        raise ProtocolError("chain frame shorter than its header length")
    (length,) = _LENGTH.unpack_from(payload, len(MAGIC))
    if length > MAX_HEADER_BYTES:
        raise LimitExceededError(f"chain frame header of {length} bytes is too large")
    if head + length > len(payload):
        raise ProtocolError("chain frame header runs past the frame")
    try:
        header = json.loads(payload[head : head + length].decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"chain frame header is not JSON: {exc}") from None
    wait, upstream, downstream = _check_header(header)
    request = payload[head + length :]
    message = decode_message(request, limits)
    shape = () if upstream is None else tuple(_template_hidden(message).shape)
    return ChainFrame(wait, upstream, downstream, request, shape)


def _fields(raw: object, names: set[str], what: str) -> dict:
    if not isinstance(raw, dict) or set(raw) != names:
        raise ProtocolError(f"chain frame {what} must hold exactly {sorted(names)}")
    peer, session_id, step = raw["peer"], raw["session_id"], raw["step"]
    if not isinstance(peer, str) or not isinstance(session_id, str):
        raise ProtocolError(f"chain frame {what}: peer and session_id must be strings")
    if not _is_peer_id(peer):
        raise ProtocolError(f"chain frame {what} names an invalid peer id")
    part, _, nonce = session_id.partition(".")
    check_client_part(part)
    check_server_nonce(nonce)
    if type(step) is not int or not 0 <= step < MAX_STEP:
        raise ProtocolError(f"chain frame {what} step must be an integer in [0, {MAX_STEP})")
    return raw


def _is_peer_id(text: str) -> bool:
    """A canonical peer id with an embedded public key (what every node here has)."""
    if not 0 < len(text) <= MAX_PEER_ID_CHARS:
        return False
    try:
        peer_id = parse_peer_id(text)
        return str(peer_id) == text and peer_id.extract_public_key() is not None
    except Exception:
        return False


def _upstream(raw: object) -> Upstream:
    fields = _fields(raw, {"peer", "session_id", "step"}, "upstream")
    return Upstream(fields["peer"], fields["session_id"], fields["step"])


def _downstream(raw: object) -> Downstream:
    fields = _fields(raw, {"peer", "addrs", "session_id", "step"}, "next")
    addrs = fields["addrs"]
    if (
        not isinstance(addrs, list)
        or not 1 <= len(addrs) <= MAX_ADDRS
        or not all(isinstance(a, str) and 0 < len(a) <= MAX_ADDR_CHARS for a in addrs)
    ):
        raise ProtocolError(f"chain frame next addrs must be 1-{MAX_ADDRS} short strings")
    return Downstream(fields["peer"], tuple(addrs), fields["session_id"], fields["step"])


def _template_hidden(message: Message) -> torch.Tensor:
    hidden = message.tensor(HIDDEN)
    if hidden.dtype != torch.float32 or hidden.dim() != 3:
        raise ProtocolError("a template's hidden_states must be float32 [batch, tokens, hidden]")
    if hidden.shape[1] > MAX_CHAIN_TOKENS:
        raise LimitExceededError(f"a chained step takes at most {MAX_CHAIN_TOKENS} tokens")
    return hidden


def splice_hidden(template: bytes, hidden: torch.Tensor, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The template's bytes with `hidden` (converted to float32) in place of its
    hidden_states data: the step request both the hop and the client compute.
    Raises ProtocolError if the shapes differ or the result does not decode."""
    placeholder = _template_hidden(decode_message(template, limits))
    if tuple(hidden.shape) != tuple(placeholder.shape):
        raise ProtocolError(
            f"input of shape {list(hidden.shape)} does not fit the template's "
            f"{list(placeholder.shape)}"
        )
    (header_len,) = struct.unpack_from("<Q", template, 0)
    body = 8 + header_len
    begin, end = json.loads(template[8:body])[HIDDEN]["data_offsets"]
    data = hidden.detach().to(torch.float32).contiguous().cpu().numpy().tobytes()
    if len(data) != end - begin:
        raise ProtocolError("input does not fit the template's hidden_states")
    raw = template[: body + begin] + data + template[body + end :]
    decode_message(raw, limits)  # NaN or Inf in the input is refused here
    return raw


def forwarded_input(answer: Message, to_session: str) -> Message:
    """What a hop sends the next one: its signed answer, addressed to `to_session`."""
    signed = SignedStatement.from_meta(answer.meta)
    return Message(
        tensors={HIDDEN: answer.tensor(HIDDEN)}, meta={**signed.to_meta(), TO_SESSION: to_session}
    )


def check_forwarded(
    message: Message, expected: Expected, sender: str, model_id: str
) -> torch.Tensor:
    """The input in a forwarded message, as float32, if it is the output the named
    upstream signed for its session step, for this model's blocks ending where the
    receiving session starts, in the template's shape, and the sender is that upstream.
    Raises ProtocolError or SignatureError."""
    upstream = expected.upstream
    if sender != upstream.peer:
        raise ProtocolError("forwarded input from a peer the client did not name as upstream")
    if set(message.tensors) != {HIDDEN} or set(message.meta) != _FORWARDED_META:
        raise ProtocolError("forwarded input must hold hidden_states, statement and signature")
    output = message.tensor(HIDDEN)
    signed = SignedStatement.from_meta(message.meta)
    signed.verify()
    s = signed.statement
    if (s.kind, s.server_peer_id, s.session_id, s.step) != (
        "inference",
        upstream.peer,
        upstream.session_id,
        upstream.step,
    ):
        raise SignatureError("forwarded statement is not the named upstream's session step")
    if s.model_id != model_id or s.end != expected.start:
        raise SignatureError("forwarded statement is not for the blocks before this session's")
    if s.dtype != dtype_name(output.dtype) or s.output_digest != tensors_digest({HIDDEN: output}):
        raise SignatureError("forwarded tensor is not the output its statement signs")
    if tuple(output.shape) != expected.shape or not output.is_floating_point():
        raise ProtocolError(f"forwarded input of shape {list(output.shape)} does not fit the step")
    return output.float()
