"""WeChat Pay API v3 signatures and encryption, as WeChat specifies them.

- A request is signed ``WECHATPAY2-SHA256-RSA2048`` with the merchant's private key over
  ``METHOD\\nURL\\nTIMESTAMP\\nNONCE\\nBODY\\n`` (URL: path and query).
- A response or notification carries ``Wechatpay-Timestamp``, ``-Nonce``, ``-Signature``
  and ``-Serial``: an RSA PKCS#1 v1.5 SHA-256 signature over ``TIMESTAMP\\nNONCE\\nBODY\\n``
  by WeChat's platform key, checked against its public key.
- A notification's ``resource`` is ``AEAD_AES_256_GCM`` under the 32-byte API v3 key.

Keys live in these objects only; their reprs name the key id, never the key.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SCHEMA = "WECHATPAY2-SHA256-RSA2048"
# WeChat refuses requests, and we refuse answers and notifications, more than five
# minutes away from our clock: a captured message cannot be replayed later.
MAX_SKEW_S = 300
APIV3_KEY_BYTES = 32
_AUTH_FIELD = re.compile(r'(\w+)="([^"]*)"')


class SignatureError(Exception):
    """A signature, timestamp or ciphertext did not check out."""


def generate_key() -> rsa.RSAPrivateKey:
    """A fresh RSA 2048 key (local runs and tests)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    """PKCS#8 PEM of a private key, as the merchant's apiclient_key.pem is."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    """SubjectPublicKeyInfo PEM of a key's public half (WeChat's pub_key.pem format)."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private(pem: bytes) -> rsa.RSAPrivateKey:
    """A PEM private key; ValueError unless it is RSA."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    return key


def load_public(pem: bytes) -> rsa.RSAPublicKey:
    """A PEM public key; ValueError unless it is RSA."""
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    return key


def sign(key: rsa.RSAPrivateKey, message: str) -> str:
    """Base64 of the SHA256-RSA (PKCS#1 v1.5) signature of ``message``."""
    signature = key.sign(message.encode(), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(signature).decode()


def verify(key: rsa.RSAPublicKey, message: str, signature: str) -> bool:
    """Whether ``signature`` (base64) signs ``message`` under ``key``."""
    try:
        raw = base64.b64decode(signature, validate=True)
        key.verify(raw, message.encode(), padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def request_message(method: str, url: str, timestamp: str, nonce: str, body: str) -> str:
    """The string a request signature covers."""
    return f"{method}\n{url}\n{timestamp}\n{nonce}\n{body}\n"


def answer_message(timestamp: str, nonce: str, body: str) -> str:
    """The string a response or notification signature covers."""
    return f"{timestamp}\n{nonce}\n{body}\n"


def nonce() -> str:
    """A fresh 32-character nonce."""
    return secrets.token_hex(16).upper()


@dataclass(frozen=True, slots=True)
class Authorization:
    """The fields of a request's Authorization header."""

    mchid: str
    nonce_str: str
    signature: str
    timestamp: str
    serial_no: str

    def header(self) -> str:
        """The header value."""
        return (
            f'{SCHEMA} mchid="{self.mchid}",nonce_str="{self.nonce_str}",'
            f'signature="{self.signature}",timestamp="{self.timestamp}",'
            f'serial_no="{self.serial_no}"'
        )

    @classmethod
    def parse(cls, header: str) -> Authorization:
        """Read an Authorization header; SignatureError when it is not WeChat Pay's."""
        schema, _, rest = header.partition(" ")
        if schema != SCHEMA:
            raise SignatureError("not a WECHATPAY2-SHA256-RSA2048 authorization")
        fields = dict(_AUTH_FIELD.findall(rest))
        try:
            return cls(
                fields["mchid"],
                fields["nonce_str"],
                fields["signature"],
                fields["timestamp"],
                fields["serial_no"],
            )
        except KeyError as exc:
            raise SignatureError(f"authorization lacks {exc.args[0]}") from None


class MerchantSigner:
    """Signs our requests with the merchant key (``serial_no``: its certificate serial)."""

    def __init__(self, mchid: str, serial_no: str, key: rsa.RSAPrivateKey) -> None:
        self.mchid = mchid
        self.serial_no = serial_no
        self._key = key

    def __repr__(self) -> str:
        return f"MerchantSigner(mchid={self.mchid!r}, serial_no={self.serial_no!r})"

    def authorization(self, method: str, url: str, body: str) -> str:
        """The Authorization header of one request."""
        timestamp, nonce_str = str(int(time.time())), nonce()
        signature = sign(self._key, request_message(method, url, timestamp, nonce_str, body))
        return Authorization(self.mchid, nonce_str, signature, timestamp, self.serial_no).header()


def fresh(timestamp: str, now: float | None = None) -> bool:
    """Whether a Unix-seconds timestamp is within MAX_SKEW_S of now."""
    try:
        at = int(timestamp)
    except ValueError:
        return False
    return abs((time.time() if now is None else now) - at) <= MAX_SKEW_S


class PlatformVerifier:
    """Checks what WeChat Pay sends us against its platform public key (``key_id``:
    the public key id, or certificate serial, WeChat names in ``Wechatpay-Serial``)."""

    def __init__(self, key_id: str, key: rsa.RSAPublicKey) -> None:
        self.key_id = key_id
        self._key = key

    def __repr__(self) -> str:
        return f"PlatformVerifier(key_id={self.key_id!r})"

    def check(self, headers: Mapping[str, str], body: str) -> str:
        """Raise SignatureError unless ``headers`` (a case-insensitive mapping, as
        aiohttp's are) sign ``body``; return the nonce."""
        timestamp = headers.get("Wechatpay-Timestamp", "")
        nonce_str = headers.get("Wechatpay-Nonce", "")
        signature = headers.get("Wechatpay-Signature", "")
        serial = headers.get("Wechatpay-Serial", "")
        if not (timestamp and nonce_str and signature):
            raise SignatureError("unsigned")
        if not hmac.compare_digest(serial.encode(), self.key_id.encode()):
            raise SignatureError(f"signed by an unknown key {serial[:64]!r}")
        if not fresh(timestamp):
            raise SignatureError("timestamp too far from now")
        if not verify(self._key, answer_message(timestamp, nonce_str, body), signature):
            raise SignatureError("bad signature")
        return nonce_str


class ApiV3Cipher:
    """AEAD_AES_256_GCM under the API v3 key: notifications' ``resource``."""

    def __init__(self, key: bytes) -> None:
        if len(key) != APIV3_KEY_BYTES:
            raise ValueError(f"the API v3 key must be {APIV3_KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "ApiV3Cipher(<key>)"

    def decrypt(self, ciphertext: str, nonce_str: str, associated_data: str) -> bytes:
        """The plaintext; SignatureError when the tag or encoding is wrong."""
        try:
            raw = base64.b64decode(ciphertext, validate=True)
            return self._aead.decrypt(nonce_str.encode(), raw, associated_data.encode())
        except (InvalidTag, binascii.Error, ValueError):
            raise SignatureError("resource does not decrypt") from None

    def encrypt(self, plaintext: bytes, nonce_str: str, associated_data: str) -> str:
        """Base64 ciphertext with its tag (what WeChat sends; the fake uses it)."""
        sealed = self._aead.encrypt(nonce_str.encode(), plaintext, associated_data.encode())
        return base64.b64encode(sealed).decode()
