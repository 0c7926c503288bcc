"""Is a database account's stored password the one we keep? Decided from what the server
stores (mysql.user's plugin and authentication string), without logging in and without a
deprecated plugin: MariaDB's `mysql_native_password` hash, MySQL 8+'s salted
`caching_sha2_password` (SHA-256 crypt with MySQL's 20-byte salt, or PBKDF2-SHA512).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

CRYPT_ALPHABET = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# SHA-256 crypt's order of the digest's bytes in its base-64 text (three bytes a group)
CRYPT_ORDER = (
    (0, 10, 20), (21, 1, 11), (12, 22, 2), (3, 13, 23), (24, 4, 14),
    (15, 25, 5), (6, 16, 26), (27, 7, 17), (18, 28, 8), (9, 19, 29),
)  # fmt: skip


def native_password_hash(password: str) -> str:
    """The `mysql_native_password` hash: '*' + SHA1(SHA1(password)), upper-case hex."""
    inner = hashlib.sha1(password.encode()).digest()
    return "*" + hashlib.sha1(inner).hexdigest().upper()


def _repeat(data: bytes, length: int) -> bytes:
    return (data * (length // len(data) + 1))[:length] if data else b""


def sha256_crypt(password: bytes, salt: bytes, rounds: int) -> bytes:
    """The 43-character digest of SHA-256 crypt (as glibc's `$5$`) for a salt of any length."""
    sha = hashlib.sha256
    alternate = sha(password + salt + password).digest()
    a = sha(password + salt)
    a.update(_repeat(alternate, len(password)))
    n = len(password)
    while n:
        a.update(alternate if n & 1 else password)
        n >>= 1
    digest = a.digest()
    p = _repeat(sha(password * len(password)).digest(), len(password))
    s = _repeat(sha(salt * (16 + digest[0])).digest(), len(salt))
    for i in range(rounds):
        h = sha(p if i & 1 else digest)
        if i % 3:
            h.update(s)
        if i % 7:
            h.update(p)
        h.update(digest if i & 1 else p)
        digest = h.digest()
    out = bytearray()

    def encode(b2: int, b1: int, b0: int, chars: int) -> None:
        word = (b2 << 16) | (b1 << 8) | b0
        for _ in range(chars):
            out.append(CRYPT_ALPHABET[word & 0x3F])
            word >>= 6

    for x, y, z in CRYPT_ORDER:
        encode(digest[x], digest[y], digest[z], 4)
    encode(0, digest[31], digest[30], 3)
    return bytes(out)


def caching_sha2_matches(stored: bytes, password: str) -> bool:
    """MySQL's caching_sha2_password string: `$A$` + rounds/1000 in 3 hex digits + `$` + 20
    salt bytes + the SHA-256 crypt digest (or `$B$`…: a PBKDF2-SHA512 digest in base 64)."""
    kind = stored[:3]
    if kind not in (b"$A$", b"$B$") or stored[6:7] != b"$":
        return False
    try:
        rounds = int(stored[3:6], 16) * 1000
    except ValueError:
        return False
    salt, digest = stored[7:27], stored[27:]
    if kind == b"$A$":
        wanted = sha256_crypt(password.encode(), salt, rounds)
    else:
        wanted = base64.b64encode(hashlib.pbkdf2_hmac("sha512", password.encode(), salt, rounds))
    return hmac.compare_digest(wanted, digest)


def stored_password_matches(plugin: str, stored_hex: str, password: str) -> bool:
    """True if the account's stored credential (`plugin`, HEX(authentication_string)) is
    `password`; anything we cannot check counts as not matching (the password is set again)."""
    try:
        stored = bytes.fromhex(stored_hex)
    except ValueError:
        return False
    if plugin == "caching_sha2_password":
        return caching_sha2_matches(stored, password)
    if plugin in ("mysql_native_password", ""):
        return hmac.compare_digest(stored, native_password_hash(password).encode())
    return False
