"""`sparkrec forget`: a customer's rows out of every table, model and old version of the warehouse.

An erasure request names customers by the key the shop knows them by; the
warehouse may hold that key or its pseudonym (`privacy.pseudonymize_user_ids`).
Their rows are found through the user key (interactions, ids, factors, lists,
the clean's state) and through the raw rows' keys (events_raw, quarantine,
where a row's user is inside the raw record). Deleting is not enough: Delta
keeps deleted rows in older versions (and, with deletion vectors, in the files
themselves), so the command then purges every table it changed.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import (
    ArrayType,
    BooleanType,
    IntegerType,
    LongType,
    MapType,
    NumericType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

from sparkrec.batch import clean
from sparkrec.core import columns as C
from sparkrec.core import pseudonyms
from sparkrec.core.config import Config, InputConfig
from sparkrec.core.errors import ConfigError

# Tables keyed by the stored user key (the raw rows and the quarantine are found by raw key instead).
BY_USER = (C.INTERACTIONS, C.CLEAN_SURVIVORS, C.CLEAN_USER_DAYS, C.WEIGHTS, C.RECOMMENDATIONS, C.LIVE_RECOMMENDATIONS,
           C.USER_IDS)
# Every table a customer's rows or traces can be in, whose history the purge removes: the ones above, the
# raw rows and the quarantine, the factors, and the item tables derived from their rows (latest price, name).
HOLDS_CUSTOMERS = (C.EVENTS_RAW, C.QUARANTINE, *BY_USER, C.USER_FACTORS, C.CLEAN_ITEM_LATEST, C.ITEMS, C.CLEAN_STATE)

ERASURES_SCHEMA = StructType([
    StructField(C.RUN_ID, StringType(), False),
    StructField("erased_at", TimestampType(), False),
    StructField("users", IntegerType(), False),
    StructField("user_hashes", ArrayType(StringType()), False),
    StructField("rows_deleted", MapType(StringType(), LongType()), False),
    StructField("model_factors_deleted", LongType(), False),
    StructField("purged", BooleanType(), False),
    StructField("note", StringType(), True),
])


def read_keys(keys: list[str], keys_file: str | None) -> list[str]:
    """The keys of a request: `--user` values and the lines of `--users-file` (blank lines skipped), deduplicated.

    Raises:
        ConfigError: no key at all, or the file cannot be read.
    """
    out = list(keys)
    if keys_file:
        try:
            out += Path(keys_file).expanduser().read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"--users-file {keys_file}: {exc.strerror or exc}") from None
    cleaned = sorted({pseudonyms.lookup_key(k) for k in out if k.strip()})
    if not cleaned:
        raise ConfigError("forget needs at least one customer: --user KEY or --users-file FILE")
    return cleaned


def stored_keys(cfg: Config, keys: list[str], secret: bytes | None) -> list[str]:
    """The keys as the warehouse stores them: pseudonyms when pseudonymisation is on."""
    if cfg.privacy.pseudonymize_user_ids:
        assert secret is not None
        return [pseudonyms.pseudonym(secret, k) for k in keys]
    return list(keys)


def raw_keys_of(raw: DataFrame, users: DataFrame, src: InputConfig) -> DataFrame:
    """(_raw_key) of the raw rows of `users`, their user column normalised as clean normalises it."""
    name = src.columns.user_id
    key = clean.clean_id(F.col(f"`{name}`"), isinstance(raw.schema[name].dataType, NumericType))
    return raw.select(key.alias("_user"), C.RAW_KEY).join(
        F.broadcast(users), F.col("_user") == users[C.USER_ID], "left_semi"
    ).select(C.RAW_KEY)


def erasure_row(run_id: str, now: datetime, stored: list[str], rows: dict[str, int], factors: int, purged: bool, note: str | None):
    return (run_id, now, len(stored), sorted(pseudonyms.user_hash(k) for k in stored), rows, factors, purged, note)
