"""Keys and sealed objects of an encrypted repository (docs/format.md, "Encryption").

A *data key* is 32 random bytes. Three subkeys are derived from it with
HKDF-SHA-256 (salt: the repository id), one per purpose, so no key serves two:
``chunk-id`` names chunks (HMAC-SHA-256 of their plain bytes), ``encrypt``
seals objects (AES-256-GCM), ``mac`` authenticates manifests. A *sealed* object
is a short header naming the key, a fresh random nonce and the ciphertext; the
object's role and name are bound to it as associated data, so a sealed chunk
cannot stand in for another chunk, or a manifest for another backup.

The data keys themselves are stored *wrapped*: sealed under a key-encryption key
that comes from the operator's credential, a key file (HKDF) or a passphrase
(scrypt).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
KEY_ID_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16
SEALED = 0x01  # header byte of an AES-256-GCM sealed object
PLAIN = 0x00  # header byte of a chunk stored in the clear, under a keyed id
HEADER_BYTES = 1 + KEY_ID_BYTES
SEALED_OVERHEAD = HEADER_BYTES + NONCE_BYTES + TAG_BYTES
# scrypt's cost: about 0.1 s and 32 MiB per unlock here, paid once per command.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
MIN_KEY_FILE_BYTES = 32


class Unopenable(Exception):
    """A sealed object that does not open: damaged, forged or under another key."""


def _subkey(secret: bytes, salt: bytes, purpose: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt,
                info=f"rbd-restore {purpose}".encode()).derive(secret)


@dataclass(frozen=True)
class DataKey:
    """One data key of a repository, with its derived subkeys."""

    key_id: str  # 16 hex digits, random, named in every object it seals
    secret: bytes = field(repr=False)
    repository_id: str
    created: str = ""
    id_key: bytes = field(init=False, repr=False)
    mac_key: bytes = field(init=False, repr=False)
    encryption_key: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        salt = bytes.fromhex(self.repository_id)
        object.__setattr__(self, "id_key", _subkey(self.secret, salt, "chunk-id"))
        object.__setattr__(self, "mac_key", _subkey(self.secret, salt, "mac"))
        object.__setattr__(self, "encryption_key", _subkey(self.secret, salt, "encrypt"))

    @classmethod
    def generate(cls, repository_id: str, created: str) -> DataKey:
        return cls(secrets.token_hex(KEY_ID_BYTES), secrets.token_bytes(KEY_BYTES),
                   repository_id, created)

    @property
    def header_id(self) -> bytes:
        return bytes.fromhex(self.key_id)

    def chunk_id(self, plain: bytes | memoryview) -> str:
        return hmac.new(self.id_key, plain, hashlib.sha256).hexdigest()

    def mac(self, data: bytes) -> str:
        return hmac.new(self.mac_key, data, hashlib.sha256).hexdigest()

    # Sealing and opening go through the streaming GCM context into one buffer: the
    # one-shot AESGCM of cryptography 38 (Debian 12's) copies its input and output,
    # and each fresh 4 MiB buffer costs page faults; here that made 1.1-1.9 CPU-s per
    # GiB of 4 MiB chunks, against 0.2 this way.

    def seal(self, context: bytes, data: bytes | memoryview) -> bytearray:
        """Header, nonce, then exactly what AES-256-GCM encryption of ``data`` gives:
        ciphertext followed by the 16-byte tag."""
        header = bytes([SEALED]) + self.header_id
        nonce = secrets.token_bytes(NONCE_BYTES)
        encryptor = Cipher(algorithms.AES(self.encryption_key), modes.GCM(nonce)).encryptor()
        encryptor.authenticate_additional_data(header + context)
        start = HEADER_BYTES + NONCE_BYTES
        sealed = bytearray(start + len(data) + TAG_BYTES)
        sealed[:start] = header + nonce
        view = memoryview(sealed)
        # The tag's room doubles as the slack update_into wants beyond the data.
        written = start + encryptor.update_into(_buffer(data), _buffer(view[start:]))
        encryptor.finalize()
        view[written:] = encryptor.tag
        return sealed

    def open(self, context: bytes, blob: bytes | bytearray) -> bytearray:
        """The plain bytes of a sealed object, only once its tag has verified."""
        if len(blob) < SEALED_OVERHEAD:
            raise Unopenable("is shorter than its header, nonce and tag")
        header = bytes(blob[:HEADER_BYTES])
        nonce = bytes(blob[HEADER_BYTES:HEADER_BYTES + NONCE_BYTES])
        tag = bytes(blob[-TAG_BYTES:])
        decryptor = Cipher(algorithms.AES(self.encryption_key),
                           modes.GCM(nonce, tag)).decryptor()
        decryptor.authenticate_additional_data(header + context)
        body = memoryview(blob)[HEADER_BYTES + NONCE_BYTES:-TAG_BYTES]
        plain = bytearray(len(body) + algorithms.AES.block_size // 8 - 1)
        written = decryptor.update_into(_buffer(body), _buffer(memoryview(plain)))
        try:
            decryptor.finalize()
        except InvalidTag:
            raise Unopenable("does not authenticate (damaged, forged or moved)") from None
        del plain[written:]
        return plain


def _buffer(view: bytes | memoryview) -> bytes:
    """cffi takes any contiguous buffer; cryptography's annotations say bytes."""
    return cast(bytes, view)


def header_of(blob: bytes | bytearray) -> tuple[int, str]:
    """(kind, key id) of a stored object's header; ``Unopenable`` when it has none."""
    if len(blob) < HEADER_BYTES or blob[0] not in (SEALED, PLAIN):
        raise Unopenable("has no rbd-restore header")
    if blob[0] == SEALED and len(blob) < SEALED_OVERHEAD:
        raise Unopenable("is shorter than its header, nonce and tag")
    return blob[0], blob[1:HEADER_BYTES].hex()


# Key-encryption keys: what the operator holds.

@dataclass(frozen=True)
class Credential:
    """A key file's bytes or a passphrase, and what it is, for messages."""

    kind: str  # "key-file" or "passphrase"
    material: bytes = field(repr=False)
    source: str = ""  # the file it came from

    def kdf(self, salt: bytes) -> dict[str, object]:
        """The parameters a new wrapping with this credential records."""
        if self.kind == "passphrase":
            return {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
                    "salt": salt.hex()}
        return {"name": "hkdf-sha256", "salt": salt.hex()}

    def derive(self, kdf: dict[str, object]) -> AESGCM:
        """The key-encryption key for stored KDF parameters; ``Unopenable`` if they are
        not ones this credential can use."""
        try:
            salt = bytes.fromhex(str(kdf["salt"]))
            name = kdf["name"]
            if name == "scrypt" and self.kind == "passphrase":
                n, r, p = (int(str(kdf[k])) for k in ("n", "r", "p"))
                if not (2 <= n <= 1 << 22 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
                    raise Unopenable("asks for scrypt parameters out of range")
                kek = hashlib.scrypt(self.material, salt=salt, n=n, r=r, p=p,
                                     maxmem=256 << 20, dklen=KEY_BYTES)
            elif name == "hkdf-sha256" and self.kind == "key-file":
                kek = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt,
                           info=b"rbd-restore key file").derive(self.material)
            else:
                raise Unopenable(f"is wrapped for a {name} credential, not a {self.kind}")
        except (KeyError, ValueError, TypeError):
            raise Unopenable("has damaged KDF parameters") from None
        return AESGCM(kek)


def wrap(credential: Credential, context: bytes, payload: bytes,
         kdf: dict[str, object] | None = None) -> tuple[dict[str, object], str]:
    """Seal ``payload`` under a key from ``credential`` (fresh KDF parameters unless
    given): (kdf parameters, hex blob)."""
    kdf = kdf or credential.kdf(secrets.token_bytes(16))
    nonce = secrets.token_bytes(NONCE_BYTES)
    blob = nonce + credential.derive(kdf).encrypt(nonce, payload, context)
    return kdf, blob.hex()


def unwrap(kek: AESGCM, context: bytes, blob_hex: str) -> bytes:
    """Open a wrapped payload with a key-encryption key from :meth:`Credential.derive`."""
    try:
        blob = bytes.fromhex(blob_hex)
        return kek.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], context)
    except (ValueError, InvalidTag):
        # A wrong credential and a damaged blob look the same to AES-GCM.
        raise Unopenable("does not open with this credential") from None
