"""Signed statements: what a server vouches for with every answer.

A statement binds the server's identity to (model, span, weights, request, output,
the output's dtype) and, for an inference step, to its session and every earlier step
of it (the chain link, protocol/sessions.py).
Anyone with the request, the answer and the reference weights can recompute the
answer, so a signed wrong statement is a fraud proof against its signer.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from libp2p.peer.id import ID

from .errors import ProtocolError, SignatureError
from .identity import Identity, parse_peer_id, verify_peer_signature
from .protocols import PROTOCOL_VERSION

_DOMAIN = b"trustswarm-statement-v2\n"
KINDS = frozenset({"forward", "inference", "backward"})
# Wire dtypes a server may compute and answer in (torch names without "torch.").
DTYPES = frozenset({"float32", "bfloat16", "float16"})
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Statement:
    kind: str
    server_peer_id: str
    model_id: str
    start: int
    end: int
    weights_digest: str
    request_digest: str
    output_digest: str
    session_id: str  # "" outside inference sessions
    step: int  # 0 outside inference sessions
    chain: str  # inference: link of steps 0..step-1 (protocol/sessions.py); "" otherwise
    dtype: str  # the output's wire dtype, the server's compute dtype (one of DTYPES)
    timestamp: float
    version: str = PROTOCOL_VERSION

    def canonical_bytes(self) -> bytes:
        return _DOMAIN + json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, text: str) -> Statement:
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError):  # incl. ints past Python's digit limit
            raise ProtocolError("statement is not JSON") from None
        if not isinstance(raw, dict) or set(raw) != set(cls.__dataclass_fields__):
            raise ProtocolError("statement has missing or unknown fields")
        str_fields = (
            "kind",
            "server_peer_id",
            "model_id",
            "weights_digest",
            "request_digest",
            "output_digest",
            "session_id",
            "chain",
            "dtype",
            "version",
        )
        if not all(isinstance(raw[f], str) and len(raw[f]) <= 256 for f in str_fields):
            raise ProtocolError("statement has a malformed text field")
        if not all(type(raw[f]) is int for f in ("start", "end", "step")):
            raise ProtocolError("statement has a malformed integer field")
        if type(raw["timestamp"]) not in (int, float):
            raise ProtocolError("statement has a malformed timestamp")
        if raw["kind"] not in KINDS:
            raise ProtocolError(f"statement kind {raw['kind'][:20]!r} is unknown")
        for f in ("weights_digest", "request_digest", "output_digest"):
            if not _is_digest(raw[f]):
                raise ProtocolError(f"statement {f} is not a sha256 hex digest")
        if raw["dtype"] not in DTYPES:
            raise ProtocolError(
                f"statement dtype {raw['dtype'][:20]!r} is not one of {sorted(DTYPES)}"
            )
        _check_session_fields(raw)
        return cls(**raw)


def _is_digest(text: str) -> bool:
    return len(text) == 64 and set(text) <= _HEX


def _check_session_fields(raw: dict) -> None:
    """Inference statements carry a session id and a chain link; others carry neither."""
    if raw["kind"] == "inference":
        if not raw["session_id"] or raw["step"] < 0:
            raise ProtocolError("an inference statement needs a session id and a step >= 0")
        if not _is_digest(raw["chain"]):
            raise ProtocolError("an inference statement's chain is not a sha256 hex digest")
    elif raw["session_id"] or raw["step"] or raw["chain"]:
        raise ProtocolError(f"a {raw['kind']} statement carries no session, step or chain")


@dataclass(frozen=True)
class SignedStatement:
    statement: Statement
    signature: bytes

    def to_meta(self) -> dict[str, str]:
        return {
            "statement": json.dumps(asdict(self.statement), sort_keys=True, separators=(",", ":")),
            "signature": self.signature.hex(),
        }

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> SignedStatement:
        if "statement" not in meta or "signature" not in meta:
            raise SignatureError("answer carries no signed statement")
        statement = Statement.from_json(meta["statement"])
        try:
            signature = bytes.fromhex(meta["signature"])
        except ValueError:
            raise SignatureError("signature is not hex") from None
        if len(signature) != 64:
            raise SignatureError("signature has the wrong length")
        return cls(statement, signature)

    def verify(self) -> None:
        """Check the signature by the key the statement names. Raises SignatureError."""
        try:
            signer = parse_peer_id(self.statement.server_peer_id)
        except Exception:
            raise SignatureError("statement names an invalid peer id") from None
        verify_peer_signature(signer, self.statement.canonical_bytes(), self.signature)


def sign_statement(identity: Identity, statement: Statement) -> SignedStatement:
    if statement.server_peer_id != str(identity.peer_id):
        raise SignatureError("a server may only sign statements in its own name")
    return SignedStatement(statement, identity.sign(statement.canonical_bytes()))


@dataclass(frozen=True)
class Expectation:
    """What the client asked for; a statement must match it field for field."""

    kind: str
    server_peer_id: ID
    model_id: str
    start: int
    end: int
    weights_digest: str
    request_digest: str
    output_digest: str
    dtype: str  # what the server announced (its signed announcement's dtype)
    session_id: str = ""
    step: int = 0
    chain: str = ""
    max_clock_skew: float = 300.0


def check_statement(signed: SignedStatement, expected: Expectation) -> None:
    """Verify signature and every field against the request. Raises SignatureError."""
    signed.verify()
    s = signed.statement
    mismatches = [
        name
        for name, got, want in (
            ("kind", s.kind, expected.kind),
            ("server_peer_id", s.server_peer_id, str(expected.server_peer_id)),
            ("model_id", s.model_id, expected.model_id),
            ("start", s.start, expected.start),
            ("end", s.end, expected.end),
            ("weights_digest", s.weights_digest, expected.weights_digest),
            ("request_digest", s.request_digest, expected.request_digest),
            ("output_digest", s.output_digest, expected.output_digest),
            ("session_id", s.session_id, expected.session_id),
            ("step", s.step, expected.step),
            ("chain", s.chain, expected.chain),
            ("dtype", s.dtype, expected.dtype),
            ("version", s.version, PROTOCOL_VERSION),
        )
        if got != want
    ]
    if mismatches:
        raise SignatureError(f"statement does not match the request: {', '.join(mismatches)}")
    if not abs(s.timestamp - time.time()) <= expected.max_clock_skew:  # NaN fails too
        raise SignatureError("statement timestamp is too far from now")
