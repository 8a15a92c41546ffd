"""Finding the few rows of a large maintained table that a small batch needs, without shuffling the table."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

# Above this many distinct keys the hash set is no longer small enough to broadcast comfortably
# (about 24 bytes a key on every executor); the caller's plain join is then the better plan.
BROADCAST_KEYS_MAX = 5_000_000

_H = "_key_hash"


def rows_for_keys(table: DataFrame, batch: DataFrame, keys: list[str]) -> DataFrame:
    """The rows of `table` whose `keys` occur in `batch`, maybe with a few others (hash collisions).

    A plain join shuffles the whole table every day, so its cost grows with history. Here the batch's
    keys become a broadcast set of 64-bit hashes that filters the table while it is scanned; only the
    candidates reach the exact join that follows, and a collision only adds a candidate that the exact
    join then drops. The result is a superset of the matching rows, never a subset: callers must still
    join on the real keys.
    """
    wanted = batch.select(F.xxhash64(*keys).alias(_H)).distinct()
    return table.join(F.broadcast(wanted), F.xxhash64(*[table[k] for k in keys]) == wanted[_H], "left_semi")
