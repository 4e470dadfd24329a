"""Evidence of what a server signed, and the disagreement reports built from it.

An exchange is a request exactly as the client sent it and the answer exactly as the
server returned it. The answer's signed statement covers the request's digest and
the output's digest, so anyone with the reference weights can recompute it: a wrong
signed answer is a fraud proof. For an inference step the earlier steps of the same
session are part of the evidence, because the step's output depends on them: they must
run from step 0 without a gap, and each statement's chain link must be the one its
predecessors give (protocol/sessions.py), so steps of different sessions, reordered or
dropped steps, and steps of different servers never open as one transcript.

Reports travel as one binary blob: magic, a length-prefixed JSON header, then the
exchanges' bytes. Decoding checks every length before slicing anything.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass

import torch

from .codec import Message, decode_message, dtype_name
from .digests import bytes_digest, tensors_digest
from .errors import ProtocolError, SignatureError
from .limits import DEFAULT_LIMITS, Limits
from .sessions import SessionChain
from .statement import SignedStatement, Statement

_MAGIC = b"TSEV1\n"
_LENGTH = struct.Struct(">I")
MAX_REPORT_BYTES = 256 * 1024 * 1024
MAX_EXCHANGES = 4096
MAX_HEADER_BYTES = 1024 * 1024
RESOLUTIONS = ("majority", "escalation", "local", "unresolved")
ANSWER_NAMES = {"forward": "hidden_states", "inference": "hidden_states", "backward": "grad_inputs"}


class EvidenceError(ProtocolError):
    """Evidence that does not hold together: bad signature, digests or ordering."""


@dataclass(frozen=True)
class OpenedExchange:
    statement: Statement
    request: Message
    output: torch.Tensor


@dataclass(frozen=True)
class SignedExchange:
    request: bytes
    answer: bytes

    def open(self, limits: Limits = DEFAULT_LIMITS) -> OpenedExchange:
        """Decode both sides and check the signature, both digests and the dtype."""
        try:
            return self._open(limits)
        except EvidenceError:
            raise
        except ProtocolError as exc:
            raise EvidenceError(f"malformed exchange: {exc}") from None

    def _open(self, limits: Limits) -> OpenedExchange:
        request = decode_message(self.request, limits)
        answer = decode_message(self.answer, limits)
        try:
            signed = SignedStatement.from_meta(answer.meta)
            signed.verify()
        except SignatureError as exc:
            raise EvidenceError(f"answer signature: {exc}") from exc
        statement = signed.statement
        name = ANSWER_NAMES.get(statement.kind)
        if name is None:
            raise EvidenceError(f"unknown statement kind {statement.kind!r}")
        if statement.request_digest != bytes_digest(self.request):
            raise EvidenceError("the statement does not cover this request")
        output = answer.tensor(name)
        if statement.output_digest != tensors_digest({name: output}):
            raise EvidenceError("the statement does not cover this output")
        if dtype_name(output.dtype) != statement.dtype:
            raise EvidenceError(
                f"the output is {dtype_name(output.dtype)}; its statement says {statement.dtype}"
            )
        return OpenedExchange(statement, request, output)


@dataclass(frozen=True)
class Evidence:
    """One signed answer; for an inference step, steps 0..n of its session in order."""

    exchanges: tuple[SignedExchange, ...]

    def open(self, limits: Limits = DEFAULT_LIMITS) -> list[OpenedExchange]:
        """Open every exchange; several only as one server's session, contiguous from
        step 0 and chained link by link. Raises EvidenceError for anything else: it never
        returns a transcript that does not hold together."""
        if not 1 <= len(self.exchanges) <= MAX_EXCHANGES:
            raise EvidenceError(f"evidence must hold 1..{MAX_EXCHANGES} exchanges")
        opened = [e.open(limits) for e in self.exchanges]
        first = opened[0].statement
        if len(opened) > 1 and first.kind != "inference":
            raise EvidenceError("only an inference session has several exchanges")
        owner = (first.kind, first.server_peer_id, first.model_id, first.start, first.end)
        for item in opened:
            s = item.statement
            if (s.kind, s.server_peer_id, s.model_id, s.start, s.end) != owner or (
                s.session_id != first.session_id
            ):
                raise EvidenceError("exchanges do not belong to one server's session")
        if first.kind == "inference":
            _check_chain([item.statement for item in opened])
        return opened

    @property
    def signer(self) -> str:
        """Peer id named by the last statement (unchecked until open() is called)."""
        answer = decode_message(self.exchanges[-1].answer)
        return SignedStatement.from_meta(answer.meta).statement.server_peer_id


@dataclass(frozen=True)
class ReplicaAnswer:
    peer_id: str
    evidence: Evidence
    cluster: int  # answers with the same number agreed with each other


@dataclass(frozen=True)
class DisagreementReport:
    """k servers answered the same request differently; who, what, and what we did."""

    model_id: str
    start: int
    end: int
    kind: str
    answers: tuple[ReplicaAnswer, ...]
    accepted_cluster: int | None  # None: no value won, the call failed
    resolution: str
    detail: str = ""
    created_at: float = 0.0

    def __post_init__(self) -> None:
        if self.resolution not in RESOLUTIONS:
            raise EvidenceError(f"resolution must be one of {RESOLUTIONS}")
        if self.kind not in ANSWER_NAMES:
            raise EvidenceError(f"kind must be one of {sorted(ANSWER_NAMES)}")
        if not self.created_at:
            object.__setattr__(self, "created_at", time.time())

    @property
    def minority(self) -> tuple[str, ...]:
        """Servers whose answers lost: the accused."""
        if self.accepted_cluster is None:
            return ()
        return tuple(a.peer_id for a in self.answers if a.cluster != self.accepted_cluster)

    @property
    def majority(self) -> tuple[str, ...]:
        if self.accepted_cluster is None:
            return ()
        return tuple(a.peer_id for a in self.answers if a.cluster == self.accepted_cluster)

    def to_bytes(self) -> bytes:
        blobs: list[bytes] = []
        answers = []
        for answer in self.answers:
            lengths = []
            for exchange in answer.evidence.exchanges:
                blobs += [exchange.request, exchange.answer]
                lengths.append([len(exchange.request), len(exchange.answer)])
            answers.append({"peer_id": answer.peer_id, "cluster": answer.cluster, "sizes": lengths})
        header = json.dumps(
            {
                "model_id": self.model_id,
                "start": self.start,
                "end": self.end,
                "kind": self.kind,
                "accepted_cluster": self.accepted_cluster,
                "resolution": self.resolution,
                "detail": self.detail,
                "created_at": self.created_at,
                "answers": answers,
            },
            separators=(",", ":"),
        ).encode()
        return _MAGIC + _LENGTH.pack(len(header)) + header + b"".join(blobs)

    @classmethod
    def from_bytes(cls, data: bytes, max_bytes: int = MAX_REPORT_BYTES) -> DisagreementReport:
        if len(data) > max_bytes:
            raise EvidenceError(f"report is {len(data)} bytes, limit {max_bytes}")
        if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + _LENGTH.size:
            raise EvidenceError("not a disagreement report")
        (header_len,) = _LENGTH.unpack_from(data, len(_MAGIC))
        offset = len(_MAGIC) + _LENGTH.size
        if header_len > MAX_HEADER_BYTES or offset + header_len > len(data):
            raise EvidenceError("report header length is out of range")
        try:
            header = json.loads(data[offset : offset + header_len])
            offset += header_len
            answers = []
            total = 0
            for item in header["answers"]:
                exchanges = []
                for request_len, answer_len in item["sizes"]:
                    sizes = (request_len, answer_len)
                    if not all(type(n) is int and n >= 0 for n in sizes):
                        raise EvidenceError("bad exchange size")
                    end = offset + request_len + answer_len
                    if end > len(data):
                        raise EvidenceError("report is truncated")
                    request = data[offset : offset + request_len]
                    exchanges.append(SignedExchange(request, data[offset + request_len : end]))
                    offset = end
                total += len(exchanges)
                if not exchanges or total > MAX_EXCHANGES:
                    raise EvidenceError("bad number of exchanges")
                answers.append(
                    ReplicaAnswer(
                        _text(item["peer_id"]), Evidence(tuple(exchanges)), _int(item["cluster"])
                    )
                )
            if offset != len(data):
                raise EvidenceError("trailing bytes after the report")
            accepted = header["accepted_cluster"]
            return cls(
                model_id=_text(header["model_id"]),
                start=_int(header["start"]),
                end=_int(header["end"]),
                kind=_text(header["kind"]),
                answers=tuple(answers),
                accepted_cluster=None if accepted is None else _int(accepted),
                resolution=_text(header["resolution"]),
                detail=_text(header["detail"]),
                created_at=float(header["created_at"]),
            )
        except EvidenceError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise EvidenceError(f"malformed report header: {exc!r}") from None


def _check_chain(statements: list[Statement]) -> None:
    """Steps 0, 1, 2, ... of one session, each carrying the link of the steps before it."""
    chain = SessionChain(statements[0].session_id)
    for i, s in enumerate(statements):
        if s.step != chain.step:
            raise EvidenceError(f"exchange {i} is step {s.step}; steps must run 0, 1, 2, ...")
        if s.chain != chain.link:
            raise EvidenceError(
                f"step {i} is not chained to the steps before it in this transcript "
                "(spliced, reordered or shortened)"
            )
        chain.advance(s)


def _text(value: object) -> str:
    if not isinstance(value, str) or len(value) > 4096:
        raise EvidenceError("expected a short string")
    return value


def _int(value: object) -> int:
    if type(value) is not int:
        raise EvidenceError("expected an integer")
    return value
