"""Secrets at rest: what the database keeps of a secret (an S3 secret key of a
project default or a queued job) is a Fernet token (AES-128-CBC + HMAC-SHA256)
under a key from the node's configuration, never the secret itself.

The key comes from `security.secret_key` (env STREAMGUARD_SECURITY__SECRET_KEY)
or `security.secret_key_file`; with neither, `<data_dir>/secret.key` is
created (mode 0600) at first use. Rotation: the new key becomes `secret_key`,
the old ones go to `previous_secret_keys` (still decrypt), and
`streamguard keys rotate-secret-key` re-encrypts every stored token with the
new key (MultiFernet.rotate), after which the old keys can go.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from .config import Settings
from .errors import ConfigError

# Stored tokens carry this mark, so a plain value is never taken for one.
PREFIX = "fernet:"


class SecretBox:
    def __init__(self, keys: list[str]) -> None:
        try:
            self._fernet = MultiFernet([Fernet(k.strip().encode()) for k in keys])
        except ValueError:
            raise ConfigError("security.secret_key (or previous_secret_keys): not a Fernet key "
                              "(32 url-safe base64-encoded bytes; `streamguard keys new-secret-key` makes one)") from None

    @classmethod
    def from_settings(cls, settings: Settings) -> "SecretBox":
        sec = settings.security
        if sec.secret_key and sec.secret_key_file:
            raise ConfigError("security: give secret_key or secret_key_file, not both")
        key = sec.secret_key
        if not key:
            path = Path(sec.secret_key_file) if sec.secret_key_file else settings.data_dir / "secret.key"
            key = _read_or_create(path, create=not sec.secret_key_file)
        return cls([key, *sec.previous_secret_keys])

    def seal(self, secret: str) -> str:
        return PREFIX + self._fernet.encrypt(secret.encode()).decode()

    def open(self, token: str) -> str:
        if not token.startswith(PREFIX):
            raise ConfigError("a stored secret is not encrypted")
        try:
            return self._fernet.decrypt(token[len(PREFIX):].encode()).decode()
        except InvalidToken:
            raise ConfigError("a stored secret cannot be decrypted with security.secret_key or "
                              "previous_secret_keys (was the key changed without keeping the old one?)") from None

    def rotate(self, token: str) -> str:
        """The same secret under the current key."""
        self.open(token)  # refuses, saying why, a token no configured key opens
        return PREFIX + self._fernet.rotate(token[len(PREFIX):].encode()).decode()


def new_key() -> str:
    return Fernet.generate_key().decode()


def _read_or_create(path: Path, *, create: bool) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        if not create:
            raise ConfigError(f"security.secret_key_file: {path} does not exist") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    key = new_key()
    try:  # O_EXCL: two processes starting at once agree on one key
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key
