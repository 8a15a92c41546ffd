"""Typed, layered configuration, validated before any Spark work starts.

A config file is YAML. It may name the files it builds on with `extends:`
(a path or a list, relative to the file), so an environment file holds only
what differs from `base.yaml`. `--set dotted.key=value` overrides come last;
their values are parsed as YAML scalars (`--set train.als.rank=64`).

Every mistake is reported as a `ConfigError` that names the dotted key, so a
typo in `train.als.rnak` fails in a second with that name, not after ten
minutes of Spark work.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from sparkrec.core import columns as C
from sparkrec.core.config.base import Strict, as_utc
from sparkrec.core.config.clean import BotsConfig, CleanConfig, PrivacyConfig
from sparkrec.core.config.evaluate import (
    CANDIDATE_KEYS,
    EvaluateConfig,
    GateConfig,
    TuneConfig,
    TuneSpace,
    with_candidate,
)
from sparkrec.core.config.input import (
    InputConfig,
    IntervalConfig,
    ItemColumns,
    ItemsConfig,
    SourceColumns,
    check_datetime_pattern,
)
from sparkrec.core.config.model import (
    AlsConfig,
    BlendConfig,
    BoostConfig,
    RankerConfig,
    RecommendConfig,
    RulesConfig,
    SimilarItemsConfig,
    TrainConfig,
)
from sparkrec.core.config.runtime import ServeConfig, SparkConfig, StreamConfig, StreamSourceConfig
from sparkrec.core.config.search import SearchConfig, SearchWeights
from sparkrec.core.errors import ConfigError

__all__ = [
    "CANDIDATE_KEYS", "AlsConfig", "BlendConfig", "BoostConfig", "BotsConfig", "CleanConfig", "Config", "EvaluateConfig",
    "GateConfig", "InputConfig", "IntervalConfig", "ItemColumns", "ItemsConfig", "PrivacyConfig", "RankerConfig", "RecommendConfig",
    "RulesConfig", "SearchConfig", "SearchWeights", "ServeConfig", "SimilarItemsConfig", "SourceColumns", "SparkConfig", "StreamConfig", "StreamSourceConfig", "TrainConfig",
    "TuneConfig", "TuneSpace", "as_utc", "check_datetime_pattern", "check_input_paths", "check_warehouse", "from_dict",
    "is_local_path", "load_config", "parse_override", "with_candidate",
]

TABLE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_REMOTE_SCHEMES = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class Config(Strict):
    warehouse: str
    checkpoint_dir: str | None = Field(default=None, description="Defaults to <warehouse>/_checkpoints.")
    tables: dict[str, str] = Field(default_factory=dict, description="Override a table's name.")
    spark: SparkConfig = SparkConfig()
    source: InputConfig
    items: ItemsConfig = ItemsConfig()
    clean: CleanConfig = CleanConfig()
    train: TrainConfig = TrainConfig()
    recommend: RecommendConfig = RecommendConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tune: TuneConfig = TuneConfig()
    interval: IntervalConfig = IntervalConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    stream: StreamConfig = StreamConfig()
    serve: ServeConfig = ServeConfig()
    search: SearchConfig = SearchConfig()
    ranker: RankerConfig = RankerConfig()

    @model_validator(mode="after")
    def _kept_columns_are_not_dropped(self) -> Config:
        mapped = {v for v in self.source.columns.model_dump().values() if v}
        clash = sorted(mapped & set(self.privacy.drop_raw_columns))
        if clash:
            raise ValueError(f"privacy.drop_raw_columns names {clash}, which source.columns maps: sparkrec needs them")
        return self

    @field_validator("tables")
    @classmethod
    def _valid_tables(cls, v: dict[str, str]) -> dict[str, str]:
        for key, name in v.items():
            if key not in C.TABLES:
                raise ValueError(f"unknown table {key!r}; allowed: {list(C.TABLES)}")
            if not TABLE_NAME_RE.match(name):
                raise ValueError(
                    f"invalid table name {name!r} for {key!r}: expected letters, digits and '_', "
                    "starting with a letter or '_'"
                )
        if len(set(v.values())) != len(v):
            raise ValueError("two tables share one name")
        return v

    def advice(self) -> list[str]:
        """Settings that are valid one by one but disagree with each other, each in one line for the log.

        Not errors: a shop may mean them. But a ratings data set whose relevant type is `view` while the lists
        exclude only `purchase` got lists full of items each user had already rated, lost to popularity, and
        nothing said why.
        """
        out = []
        ev, rec = self.evaluate, self.recommend
        missing = [t for t in ev.relevant_event_types if t not in rec.exclude_event_types]
        if ev.enabled and missing and not ev.repeat_relevant:
            out.append(
                f"evaluate.relevant_event_types {ev.relevant_event_types} holds {missing}, which "
                f"recommend.exclude_event_types {rec.exclude_event_types} does not: the lists may offer items a "
                f"customer already had ({', '.join(missing)}), which the evaluation counts as hits only when the "
                "customer comes back to them; add them to recommend.exclude_event_types, or set "
                "evaluate.repeat_relevant: true if customers come back for them"
            )
        return out

    def table_name(self, key: str) -> str:
        return self.tables.get(key, key)

    def table_path(self, key: str) -> str:
        return f"{self.warehouse.rstrip('/')}/{self.table_name(key)}"

    @property
    def search_root(self) -> str:
        """Where the search index versions go (one directory each, named by its digest)."""
        return self.search.index_dir or f"{self.warehouse.rstrip('/')}/_search"

    @property
    def checkpoint_root(self) -> str:
        return self.checkpoint_dir or f"{self.warehouse.rstrip('/')}/_checkpoints"

    @property
    def stream_checkpoint(self) -> str:
        return self.stream.checkpoint or f"{self.checkpoint_root.rstrip('/')}/stream"

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def search_key(self) -> str:
        """What a tuning result depends on: the search, the split and metric it is judged by, the base settings.

        Two runs with the same key would search the same space on the same terms,
        so one's winner can stand for the other's (`tune.reuse_days`).
        """
        parts = {
            "tune": self.tune.model_dump(mode="json", exclude={"reuse_days", "max_minutes", "min_users", "enabled"}),
            "evaluate": self.evaluate.model_dump(mode="json", exclude={"enabled", "gate"}),
            "train": self.train.model_dump(mode="json"),
            "recommend": self.recommend.model_dump(mode="json"),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def rules_key(self) -> str:
        """What a row's classification depends on: the input mapping and the clean rules.

        The incremental clean keeps earlier rows' outcomes; when this key
        changes they would no longer be what the rules say, so it recomputes.
        """
        parts = {
            "source": self.source.model_dump(mode="json", exclude={"path"}),
            "clean": self.clean.model_dump(mode="json", exclude={"full", "min_kept_ratio"}),
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def digest(self) -> str:
        """A short hash of the effective config, recorded with every run."""
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- loading


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config file {path} extends itself (cycle: {' -> '.join(map(str, seen + (path,)))})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, not {type(data).__name__}")
    parents = data.pop("extends", None) or []
    if isinstance(parents, str):
        parents = [parents]
    merged: dict[str, Any] = {}
    for parent in parents:
        merged = _deep_merge(merged, _load_yaml(path.parent / parent, seen + (path,)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value` into (['a','b','c'], value), the value as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        # Never fall back to the raw text: `!!python/...` or a broken quote would
        # silently become a literal string (a warehouse directory of that name).
        reason = str(exc).splitlines()[0]
        raise ConfigError(
            f"override {key.strip()!r}: value {raw!r} is not a valid YAML value ({reason}); "
            "quote it if you meant a string: --set 'key=\"text\"'"
        ) from None
    return parts, value


def _apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top)"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and not isinstance(err["input"], dict):
                msg += f" (got {err['input']!r})"
        lines.append(f"config key '{key}': {msg}")
    return "; ".join(lines)


def from_dict(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


# Overrides from the environment, `;`-separated (`SPARKREC_SET="ranker.enabled=false;recommend.n=10"`),
# applied before `--set`: a scheduler or container sets them once for every command it starts.
ENV_OVERRIDES = "SPARKREC_SET"


def env_overrides() -> list[str]:
    return [part.strip() for part in os.environ.get(ENV_OVERRIDES, "").split(";") if part.strip()]


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a layered config file, apply the `SPARKREC_SET` overrides, then `--set` overrides, and validate it.

    Example:
        cfg = load_config("conf/local.yaml", ["recommend.n=10"])
    """
    data = _load_yaml(Path(path))
    for text in [*env_overrides(), *(overrides or [])]:
        parts, value = parse_override(text)
        _apply_override(data, parts, value)
    return from_dict(data)


def is_local_path(path: str) -> bool:
    return not _REMOTE_SCHEMES.match(path) or path.startswith("file://")


def check_warehouse(cfg: Config) -> None:
    """Fail early when a local warehouse (or checkpoint) path is a file, or lies under one."""
    for key, path in (("warehouse", cfg.warehouse), ("checkpoint_dir", cfg.checkpoint_dir)):
        if not path or not is_local_path(path):
            continue
        local = Path(path.removeprefix("file://")).expanduser()
        for p in (local, *local.parents):
            if p.exists():
                if not p.is_dir():
                    where = "is a file" if p == local else f"lies under {p}, which is a file"
                    raise ConfigError(f"config key '{key}': {path} {where}; it must be a directory (created if missing)")
                break


def check_input_paths(cfg: Config) -> None:
    """Fail early when a local input path does not exist (remote paths are left to Spark)."""
    for key, path in (("source.path", cfg.source.path), ("items.path", cfg.items.path)):
        if path and is_local_path(path):
            local = Path(path.removeprefix("file://"))
            if not local.exists():
                raise ConfigError(f"config key '{key}': input path does not exist: {path}")
