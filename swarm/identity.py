"""One key per node: its libp2p identity also signs its DHT records, so a record about peer X counts only if
X's own key made it.

hivemind signs a record with an RSA key whose public half sits in the record's subkey
(`<peer id>[owner:ssh-rsa …]`), but nothing ties that key to the peer id written before it: any node
could store records "about" another peer, signed with its own key. Here the signing key *is* the
libp2p identity (an RSA key, as hivemind makes them), and a libp2p peer id is the hash of its public
key: validators and readers recompute the id from the key in the subkey and refuse a mismatch.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import multihash
from cryptography.hazmat.primitives import serialization
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from swarm.errors import SwarmError


def prepare_identity(path: Path | str | None) -> tuple[str, RSAPrivateKey, bool]:
    """(identity file for p2pd, its key for signing records, whether it existed before this process).

    Without PATH, a new identity lives in a private temporary folder until this process ends."""
    try:
        return _prepare(path)
    except Exception as e:  # unreadable, not a key, not an RSA key
        raise SwarmError(f"cannot use the identity file {path}: {e or type(e).__name__}") from None


def _prepare(path: Path | str | None) -> tuple[str, RSAPrivateKey, bool]:
    if path is None:
        folder = tempfile.mkdtemp(prefix="swarm-identity-")
        atexit.register(shutil.rmtree, folder, True)
        path = os.path.join(folder, "identity.key")
        P2P.generate_identity(path)
        existed = False
    else:
        existed = os.path.isfile(path)
        if not existed:
            P2P.generate_identity(str(path))
    with open(path, "rb") as f:
        der = crypto_pb2.PrivateKey.FromString(f.read()).data
    key = RSAPrivateKey.__new__(RSAPrivateKey)  # hivemind's key class reads only its own pickled form
    key.__setstate__({"_private_key": der})
    return str(path), key, existed


@functools.lru_cache(maxsize=4096)
def peer_id_of_key(ssh_public_key: bytes) -> str | None:
    """The libp2p peer id of an RSA public key in OpenSSH form (as hivemind writes it in subkeys); None if unreadable."""
    try:
        key = serialization.load_ssh_public_key(ssh_public_key)
        der = key.public_bytes(encoding=serialization.Encoding.DER,
                               format=serialization.PublicFormat.SubjectPublicKeyInfo)
    except Exception:
        return None
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()
