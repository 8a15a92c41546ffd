"""Customer keys as personal data: the pseudonym secret and the keyed hash, with no Spark.

A pseudonym is HMAC-SHA256 of the user key under a secret the shop keeps
outside the config (an environment variable or a file). The same key gives the
same pseudonym in every run, so ids, history and models stay stable, and the
shop can still find a customer (`sparkrec lookup-user KEY`); without the secret
nobody can go from a pseudonym back to a key, or test a guessed key. Ingest
(`batch.privacy`) and anything answering for a customer without Spark hash with
this one function.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from sparkrec.core.config import PrivacyConfig
from sparkrec.core.errors import ConfigError

MIN_SECRET_LENGTH = 16
PREFIX = "p_"


def load_secret(privacy: PrivacyConfig) -> bytes:
    """The pseudonym secret, from `privacy.secret_file` or the `privacy.secret_env` variable.

    Raises:
        ConfigError: pseudonymisation is on and the secret is missing, empty or too short; raised
            before Spark starts, naming where it was looked for.
    """
    if privacy.secret_file:
        path = Path(privacy.secret_file).expanduser()
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"config key 'privacy.secret_file': cannot read the pseudonym secret from {path}: "
                              f"{exc.strerror or exc}") from None
        where = f"the file {path} (privacy.secret_file)"
    else:
        secret = os.environ.get(privacy.secret_env, "").strip()
        where = f"the environment variable {privacy.secret_env} (privacy.secret_env)"
    if not secret:
        raise ConfigError(f"privacy.pseudonymize_user_ids is on but {where} is empty or unset: "
                          "set it to a long random secret, and keep it (a new secret gives every customer a new pseudonym)")
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(f"the pseudonym secret in {where} has {len(secret)} characters; use at least "
                          f"{MIN_SECRET_LENGTH} (a short secret can be guessed, and with it every key)")
    return secret.encode("utf-8")


def pseudonym(secret: bytes, key: str) -> str:
    """The pseudonym of one (already normalised) user key."""
    return PREFIX + hmac.new(secret, key.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def lookup_key(key: str) -> str:
    """A key as a person types it, normalised the way ingest normalises a text column (surrounding blanks)."""
    return key.strip()


def user_hash(stored: str) -> str:
    """What the erasures table keeps of a customer: SHA-256 of the stored key (proof of which request it was, not
    the key). The server matches it against the keys it holds to drop an erased customer."""
    return hashlib.sha256(stored.encode("utf-8")).hexdigest()
