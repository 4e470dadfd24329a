"""Inference session ids and the hash chain that binds each step to the steps before it.

Session id: the client sends its part (`new_client_part`) when it opens a session; the
server answers with a nonce of its own; the id used in every step request and every
signed statement is `<client part>.<server nonce>` (`session_id_of`). A client cannot
make two sessions with the same id, because the server draws the second half.

Chain: every inference statement carries the link of the steps before it:

    link_0     = sha256("trustswarm-session-chain-v1\\nstart\\n" || session_id)
    link_{n+1} = sha256("trustswarm-session-chain-v1\\nstep\\n" || link_n || "\\n" ||
                        request_digest_n || "\\n" || output_digest_n)

Statement n carries link_n, its own request and output digests, so it commits to the
whole session up to and including step n. Server, client, evidence and verifier all
walk the chain with `SessionChain`; nothing else computes a link.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from .errors import ProtocolError
from .statement import Statement

_CHAIN_DOMAIN = b"trustswarm-session-chain-v1\n"
_CLIENT_PART = re.compile(r"[A-Za-z0-9_-]{8,64}")
_NONCE = re.compile(r"[0-9a-f]{32}")
SEPARATOR = "."


class SessionError(ProtocolError):
    """A server's answer to a session open does not name a session built as above."""


def new_client_part() -> str:
    return secrets.token_hex(16)


def new_server_nonce() -> str:
    return secrets.token_hex(16)


def check_client_part(part: str) -> str:
    """The client's half of a session id: 8-64 characters of [A-Za-z0-9_-]."""
    if not _CLIENT_PART.fullmatch(part):
        raise ProtocolError("session_id must be 8-64 characters of A-Z, a-z, 0-9, '_' and '-'")
    return part


def check_server_nonce(nonce: str) -> str:
    """The server's half of a session id: 32 lowercase hex characters."""
    if not _NONCE.fullmatch(nonce):
        raise ProtocolError("the server's session nonce is not 32 lowercase hex characters")
    return nonce


def session_id_of(client_part: str, server_nonce: str) -> str:
    """The id of a session: both halves, checked, joined by '.'."""
    return check_client_part(client_part) + SEPARATOR + check_server_nonce(server_nonce)


def first_link(session_id: str) -> str:
    return hashlib.sha256(_CHAIN_DOMAIN + b"start\n" + session_id.encode()).hexdigest()


def next_link(link: str, request_digest: str, output_digest: str) -> str:
    body = f"{link}\n{request_digest}\n{output_digest}".encode()
    return hashlib.sha256(_CHAIN_DOMAIN + b"step\n" + body).hexdigest()


@dataclass
class SessionChain:
    """Where a session stands: the next step's number and the link its statement carries."""

    session_id: str
    step: int = 0
    link: str = ""  # computed from session_id when not given

    def __post_init__(self) -> None:
        if not self.link:
            self.link = first_link(self.session_id)

    def advance(self, statement: Statement) -> None:
        """Move past `statement`, the signed answer to the current step."""
        self.link = next_link(self.link, statement.request_digest, statement.output_digest)
        self.step += 1
