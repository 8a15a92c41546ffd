"""Every table read of the server, with delta-rs (no JVM): the one place `sparkrec.serve` touches Delta.

Reads go through delta-rs's DataFusion engine (`QueryBuilder`), not
`DeltaTable.to_pandas()`: the pyarrow reader refuses tables with deletion
vectors, which `interactions` and the state tables carry, while the engine
reads them and honours the deleted rows (checked against Spark). A read names
its table and version, so what the server loaded can be compared with what a
batch run recorded.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
from deltalake import DeltaTable, QueryBuilder
from deltalake.exceptions import TableNotFoundError

from sparkrec.core import columns as C
from sparkrec.core.config import Config
from sparkrec.core.errors import StageError

log = logging.getLogger(__name__)


@dataclass
class Read:
    """A table's rows as read, and the version they were read at."""

    table: str
    version: int
    frame: pd.DataFrame | pa.Table


def _open(cfg: Config, key: str, version: int | None) -> DeltaTable | None:
    path = cfg.table_path(key)
    try:
        return DeltaTable(path, version=version)
    except TableNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - delta-rs raises several kinds for a missing or unreadable version
        raise StageError(f"table '{cfg.table_name(key)}' at {path}: cannot open"
                         f"{'' if version is None else f' version {version}'} with delta-rs: {exc}") from None


def current_version(cfg: Config, key: str) -> int | None:
    """The table's latest version, or None when it does not exist."""
    dt = _open(cfg, key, None)
    return None if dt is None else dt.version()


def read(cfg: Config, key: str, columns: list[str] | tuple[str, ...], *, version: int | None = None,
         where: str | None = None, required: bool = True, optional: tuple[str, ...] = (),
         arrow: bool = False) -> Read | None:
    """The named columns of a table (at `version`, default the latest), optionally filtered by a SQL predicate.

    Args:
        optional: columns a table may lack (an input without ratings): read as nulls when absent.
        arrow: the rows as a pyarrow Table in `Read.frame` (no Python object per cell: the big tables).
    Raises:
        StageError: the table is missing (when `required`), or lacks a column, naming both.
    """
    dt = _open(cfg, key, version)
    name = cfg.table_name(key)
    if dt is None:
        if required:
            raise StageError(f"table '{name}' does not exist at {cfg.table_path(key)}: run the batch first "
                             "(`sparkrec run`), which publishes it")
        return None
    have = {f.name for f in dt.schema().fields}
    absent = [c for c in columns if c not in have and c in optional]
    columns = [c for c in columns if c not in absent]
    missing = [c for c in columns if c not in have]
    if missing:
        raise StageError(f"table '{name}' (version {dt.version()}) has no column(s) {missing}; it has {sorted(have)}")
    sql = "SELECT " + ", ".join(f'"{c}"' for c in columns) + " FROM t" + (f" WHERE {where}" if where else "")
    try:
        table = pa.table(QueryBuilder().register("t", dt).execute(sql).read_all())
    except Exception as exc:  # noqa: BLE001 - delta-rs raises its own kinds; a purged version's files are gone
        raise StageError(f"table '{name}' version {dt.version()}: cannot read: {str(exc).splitlines()[0][:300]}") from None
    # DataFusion hands text as string_view (also inside lists and maps); pandas wants plain strings.
    table = table.cast(pa.schema([pa.field(f.name, plain(f.type)) for f in table.schema]))
    if arrow:
        for c in absent:
            table = table.append_column(c, pa.nulls(table.num_rows, pa.float64()))
        return Read(name, dt.version(), table)
    frame = table.to_pandas()
    for c in absent:
        frame[c] = None
    return Read(name, dt.version(), frame)


def plain(t: pa.DataType) -> pa.DataType:
    """`t` with every string_view (and binary_view) inside it made a plain string (binary)."""
    if pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_binary_view(t):
        return pa.binary()
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return pa.list_(plain(t.value_type))
    if pa.types.is_map(t):
        return pa.map_(plain(t.key_type), plain(t.item_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, plain(f.type)) for f in t])
    return t


def quoted(text: str) -> str:
    """A SQL string literal (single quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"


def latest_recommend_run(cfg: Config, after: str | None = None) -> dict[str, Any] | None:
    """The newest succeeded `recommend` stage in `runs` (its run id, versions and details), or None.

    Args:
        after: only a run whose id sorts after this one (run ids sort by time).
    """
    cond = "stage = 'recommend' AND status = 'succeeded'" + (f" AND {C.RUN_ID} > {quoted(after)}" if after else "")
    got = read(cfg, C.RUNS, [C.RUN_ID, "finished_at", "input_versions", "output_versions", "details"], where=cond,
               required=False)
    if got is None or got.frame.empty:
        return None
    row = got.frame.sort_values([C.RUN_ID]).iloc[-1]
    return {
        C.RUN_ID: row[C.RUN_ID],
        "finished_at": row["finished_at"],
        "inputs": dict(row["input_versions"] or []),
        "outputs": dict(row["output_versions"] or []),
        "details": json.loads(row["details"] or "{}"),
        "runs_version": got.version,
    }


def commit_time(cfg: Config, key: str, version: int) -> datetime | None:
    """When a version of a table was committed (None: not in its log any more)."""
    dt = _open(cfg, key, None)
    if dt is None:
        return None
    for entry in dt.history():
        if entry.get("version") == version:
            return datetime.fromtimestamp(entry["timestamp"] / 1000, tz=timezone.utc)
    return None


def erasures(cfg: Config) -> Read | None:
    """Every erasure `sparkrec forget` recorded: (erased_at, user_hashes), or None when there was none."""
    return read(cfg, C.ERASURES, ["erased_at", "user_hashes"], required=False)


def read_text(path: str, what: str) -> str:
    """A text file a run wrote beside its tables (a local path or any URI pyarrow's filesystems open).

    Raises:
        StageError: the file cannot be read, naming `what` it is and where.
    """
    import pyarrow.fs as pafs

    try:
        if "://" in path:
            fs, inner = pafs.FileSystem.from_uri(path)
        else:
            fs, inner = pafs.LocalFileSystem(), os.path.abspath(path.removeprefix("file:"))
        with fs.open_input_stream(inner) as f:
            return f.read().decode("utf-8")
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a missing or unreadable file
        raise StageError(f"{what} at {path}: cannot read: {exc}") from None
