"""Customer keys as personal data: pseudonyms made at ingest, before anything is written.

A pseudonym is HMAC-SHA256 of the user key under a secret the shop keeps
outside the config (an environment variable or a file). The same key gives the
same pseudonym in every run, so ids, history and models stay stable, and the
shop can still find a customer (`sparkrec lookup-user KEY`); without the secret
nobody can go from a pseudonym back to a key, or test a guessed key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import TYPE_CHECKING

from sparkrec import columns as C
from sparkrec.config import CleanConfig, InputConfig, PrivacyConfig
from sparkrec.errors import ConfigError

if TYPE_CHECKING:  # `lookup-user` and the secret check run without Spark
    from pyspark.sql import DataFrame

MIN_SECRET_LENGTH = 16
PREFIX = "p_"
# What an id that breaks the id rule becomes: its value is not stored, and the control character keeps
# the clean's `invalid_user_id` rule quarantining the row as before.
INVALID_KEY = "\x1fwithheld: not a valid user id"
# Table property of `events_raw`: whether its user keys are pseudonyms (a warehouse is one or the other).
RAW_PROPERTY = "sparkrec.pseudonymizedUserIds"


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


def pseudonymize(raw: DataFrame, src: InputConfig, rules: CleanConfig, secret: bytes) -> DataFrame:
    """Raw rows with the user column replaced by pseudonyms, before lineage is added or anything written.

    The key is normalised first as clean would (`clean.clean_id`: trimmed, 13085.0 from a numeric
    column is 13085), so the pseudonym matches `lookup-user`. Ids that break the id rule are not
    hashed (that would make them valid): they become `INVALID_KEY`. A malformed line's text would
    carry the raw key too, so it is replaced by a note of its length.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.types import NumericType

    from sparkrec import clean

    name = src.columns.user_id
    field = raw.schema[name]
    key = clean.clean_id(F.col(f"`{name}`"), isinstance(field.dataType, NumericType))
    bad = clean.invalid_id(key, rules.max_id_length, src.format == "json")
    hashed = _hmac_udf(secret)(key)
    out = raw.withColumn(name, F.when(key.isNull(), F.lit(None).cast("string")).when(bad, F.lit(INVALID_KEY)).otherwise(hashed))
    if C.CORRUPT_RECORD in out.columns:
        text = F.col(C.CORRUPT_RECORD)
        out = out.withColumn(C.CORRUPT_RECORD, F.when(text.isNotNull(), F.concat(
            F.lit("<malformed line withheld (user keys are pseudonymised): "), F.length(text).cast("string"), F.lit(" characters>"))))
    return out


def _hmac_udf(secret: bytes):
    """A vectorised UDF: the secret travels in the function's closure, never as a literal in a query plan
    (plans are shown in the Spark UI and in error messages)."""
    import pandas as pd
    from pyspark.sql import functions as F

    def hmac_keys(keys):
        return keys.map(lambda k: None if k is None else pseudonym(secret, k))

    # Real classes, not the strings `from __future__ import annotations` would leave (Spark reads the hints).
    hmac_keys.__annotations__ = {"keys": pd.Series, "return": pd.Series}
    return F.pandas_udf(hmac_keys, "string")


def prepare_raw(raw: DataFrame, cfg, existing: dict[str, str] | None, secret: bytes | None) -> DataFrame:
    """The raw rows as ingest may store them: `privacy.drop_raw_columns` dropped and, when on, keys pseudonymised.

    Args:
        existing: `events_raw`'s table properties (None before the first ingest). A warehouse holds either
            raw keys or pseudonyms, never both: switching in either direction is an error here.
    """
    on = cfg.privacy.pseudonymize_user_ids
    if existing is not None:
        was = existing.get(RAW_PROPERTY, "false") == "true"
        if was != on:
            raise ConfigError(
                f"privacy.pseudonymize_user_ids is {'on' if on else 'off'} but events_raw in {cfg.warehouse} holds "
                f"{'pseudonyms' if was else 'raw user keys'}: a warehouse cannot mix them. "
                + ("Turn it on in a new warehouse: the keys already stored are not rewritten." if on else
                   "Turn it back on, with the same secret.")
            )
    dropped = [c for c in cfg.privacy.drop_raw_columns if c in raw.columns]
    if dropped:
        raw = raw.drop(*dropped)
    if on:
        assert secret is not None
        raw = pseudonymize(raw, cfg.source, cfg.clean, secret)
    return raw


def raw_table_properties(cfg) -> dict[str, str]:
    """What `events_raw` records about its keys when ingest creates it."""
    return {RAW_PROPERTY: "true" if cfg.privacy.pseudonymize_user_ids else "false"}
