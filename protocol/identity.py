"""Ed25519 identities: the key that names a peer on libp2p also signs its answers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PublicKey
from libp2p.crypto.ed25519 import create_new_key_pair as _new_ed25519
from libp2p.crypto.keys import KeyPair
from libp2p.identity_utils import load_identity, save_identity
from libp2p.peer.id import ID

from .errors import IdentityError, SignatureError


@dataclass(frozen=True)
class Identity:
    key_pair: KeyPair

    @classmethod
    def generate(cls) -> Identity:
        return cls(_new_ed25519())

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the key at `path`, or create it (mode 0600) so the peer id is stable."""
        path = Path(path)
        if path.exists():
            try:
                key_pair = load_identity(path)
            except (ValueError, OSError) as exc:
                raise IdentityError(f"cannot read identity key {path}: {exc}") from None
            if not isinstance(key_pair.public_key, Ed25519PublicKey):
                raise IdentityError(f"identity key {path} is not an Ed25519 key")
            return cls(key_pair)
        identity = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_identity(identity.key_pair, path)
        return identity

    @property
    def peer_id(self) -> ID:
        return ID.from_pubkey(self.key_pair.public_key)

    def sign(self, data: bytes) -> bytes:
        return self.key_pair.private_key.sign(data)


def parse_peer_id(text: str) -> ID:
    try:
        return ID.from_base58(text)
    except Exception:
        raise IdentityError(f"not a peer id: {text[:80]!r}") from None


def verify_peer_signature(peer_id: ID, data: bytes, signature: bytes) -> None:
    """Check `signature` by the Ed25519 key embedded in `peer_id`. Raises SignatureError."""
    try:
        public_key = peer_id.extract_public_key()
    except Exception:
        public_key = None
    if not isinstance(public_key, Ed25519PublicKey):
        raise SignatureError(f"peer id {peer_id} does not embed an Ed25519 key")
    if ID.from_pubkey(public_key) != peer_id:
        raise SignatureError("peer id does not match its embedded key")
    try:
        ok = public_key.verify(data, signature)
    except Exception:
        ok = False
    if not ok:
        raise SignatureError(f"bad signature from {peer_id}")
