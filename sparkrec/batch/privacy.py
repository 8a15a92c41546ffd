"""Pseudonyms at ingest: the raw user column replaced before anything is written.

The secret and the hash itself are in `core.pseudonyms` (no Spark), so that
`lookup-user` and a server hash a key exactly as ingest does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparkrec.core import columns as C
from sparkrec.core.config import CleanConfig, InputConfig
from sparkrec.core.errors import ConfigError
from sparkrec.core.pseudonyms import pseudonym

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

# What an id that breaks the id rule becomes: its value is not stored, and the control character keeps
# the clean's `invalid_user_id` rule quarantining the row as before.
INVALID_KEY = "\x1fwithheld: not a valid user id"
# Table property of `events_raw`: whether its user keys are pseudonyms (a warehouse is one or the other).
RAW_PROPERTY = "sparkrec.pseudonymizedUserIds"


def pseudonymize(raw: DataFrame, src: InputConfig, rules: CleanConfig, secret: bytes) -> DataFrame:
    """Raw rows with the user column replaced by pseudonyms, before lineage is added or anything written.

    The key is normalised first as clean would (`clean.clean_id`: trimmed, 13085.0 from a numeric
    column is 13085), so the pseudonym matches `lookup-user`. Ids that break the id rule are not
    hashed (that would make them valid): they become `INVALID_KEY`. A malformed line's text would
    carry the raw key too, so it is replaced by a note of its length.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.types import NumericType

    from sparkrec.batch import clean

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
