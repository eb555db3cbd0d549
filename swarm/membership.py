"""Private swarms: a key shared by the members, which they prove they hold in their records and their calls.

A record carries `member_proof`, an HMAC of its owner's peer id: public in the DHT, it proves
membership for that peer id only, and records are bound to their owners' identities. A call carries
`member`, an HMAC the members alone can compute: members send it only to peers whose records proved
membership, and libp2p encrypts every connection, so it never reaches an outsider.
"""
from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from swarm.errors import SwarmError

KEY_BYTES = 32
NOT_MEMBER = "this is a private swarm and the caller does not hold its key: start with --swarm-key FILE (the swarm's key)"


class SwarmKey:
    def __init__(self, secret: bytes):
        if len(secret) != KEY_BYTES:
            raise SwarmError(f"a swarm key is {KEY_BYTES} bytes, got {len(secret)}")
        self._secret = secret
        self.call_token = self._mac(b"call")

    @classmethod
    def load(cls, path: Path) -> "SwarmKey":
        """A file of 64 hex digits, e.g. from `python -c 'import secrets; print(secrets.token_hex(32))' > swarm.key`."""
        try:
            text = Path(path).read_text().strip()
        except OSError as e:
            raise SwarmError(f"cannot read the swarm key {path}: {e.strerror}") from None
        try:
            secret = bytes.fromhex(text)
        except ValueError:
            secret = b""
        if len(secret) != KEY_BYTES:
            raise SwarmError(f"the swarm key {path} must hold {2 * KEY_BYTES} hex digits; make one with "
                             "python -c 'import secrets; print(secrets.token_hex(32))' > swarm.key")
        return cls(secret)

    def _mac(self, what: bytes) -> str:
        return hmac.new(self._secret, b"swarm-llm member\0" + what, hashlib.sha256).hexdigest()

    def record_proof(self, peer_id: str) -> str:
        return self._mac(b"record\0" + peer_id.encode())

    def admits_record(self, peer_id: str, proof: str | None) -> bool:
        return proof is not None and hmac.compare_digest(proof, self.record_proof(peer_id))

    def admits_call(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token, self.call_token)


def admits_call(key: SwarmKey | None, token: str | None) -> bool:
    """Whether a peer with KEY (None: an open swarm, which admits everyone) takes a call carrying TOKEN."""
    return key is None or key.admits_call(token)
