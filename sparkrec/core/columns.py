"""Column and table names shared by every stage.

One module owns them so a rename is one edit, and so MLlib's own defaults
("user", "item", "rating") never leak into our tables.
"""

from __future__ import annotations

# Canonical interaction columns (table `interactions`).
USER_ID = "user_id"
ITEM_ID = "item_id"
EVENT_TYPE = "event_type"
EVENT_TS = "event_ts"
EVENT_ID = "event_id"
QUANTITY = "quantity"
PRICE = "price"
RATING = "rating"

# Integer ids for ALS (tables `user_ids`, `item_ids`, factors).
USER_IDX = "user_idx"
ITEM_IDX = "item_idx"
FEATURES = "features"
WEIGHT = "weight"

# Lineage columns.
SOURCE_FILE = "_source_file"
INGEST_RUN_ID = "_ingest_run_id"
RAW_KEY = "_raw_key"
ROW_HASH = "_row_hash"
CORRUPT_RECORD = "_corrupt_record"
# When the event reached sparkrec's input (a Kafka message's timestamp, a streamed file's modification
# time): the live path measures its latency from it. Null for batch ingest.
ARRIVED_AT = "_arrived_at"
# What ingest adds to every raw row (everything else in events_raw came from the input).
LINEAGE_COLUMNS = (SOURCE_FILE, INGEST_RUN_ID, ROW_HASH, RAW_KEY, ARRIVED_AT)
RUN_ID = "run_id"

# Quarantine.
RAW_RECORD = "raw_record"
REASON = "reason"

# Items.
CATEGORY = "category"
AVAILABLE = "available"
DESCRIPTION = "description"
# The item's name for people (explanations read "because you bought <name>"); null when unknown.
ITEM_NAME = "name"

# Recommendations.
RANK = "rank"
SCORE = "score"
# Where a recommendation came from (the table column `source`: als, popular, ...);
# not the input config (`config.InputConfig`) nor the lineage column `_source_file`.
REC_SOURCE = "source"
MODEL_VERSION = "model_version"
GENERATED_AT = "generated_at"

EXPLANATION = "explanation"
BECAUSE_ITEM_ID = "because_item_id"
SIMILAR_ITEM_ID = "similar_item_id"

SOURCE_ALS = "als"
# The model's candidates ordered by the learned ranker (`core.ranker`), when the gate chose it.
SOURCE_RANKED = "ranked"
MODEL_SOURCES = (SOURCE_ALS, SOURCE_RANKED)
SOURCE_POPULAR = "popular"
SOURCE_TRENDING = "trending"
SOURCE_CATEGORY_POPULAR = "category_popular"
SOURCE_EXPLORATION = "exploration"

# Canonical event types.
VIEW = "view"
CART = "cart"
PURCHASE = "purchase"
RATING_EVENT = "rating"
CANCELLATION = "cancellation"
EVENT_TYPES = (VIEW, CART, PURCHASE, RATING_EVENT)

# Table keys, as used in config `tables:` and in the `runs` table.
EVENTS_RAW = "events_raw"
INTERACTIONS = "interactions"
QUARANTINE = "quarantine"
USER_IDS = "user_ids"
ITEM_IDS = "item_ids"
ITEMS = "items"
USER_FACTORS = "user_factors"
ITEM_FACTORS = "item_factors"
RECOMMENDATIONS = "recommendations"
SIMILAR_ITEMS = "similar_items"
RUNS = "runs"
# The maintained user-item feedback table (`train` builds its matrix from it) and the
# state the incremental clean keeps so that a day's run reads only the day's rows.
WEIGHTS = "user_item_weights"
CLEAN_STATE = "clean_state"
CLEAN_SURVIVORS = "clean_survivors"
CLEAN_USER_DAYS = "clean_user_days"
CLEAN_ITEM_LATEST = "clean_item_latest"
ERASURES = "erasures"  # one row per `sparkrec forget` request
# The stream's lists of the customers it re-scored (`sparkrec stream`); readers take, per customer,
# the newer of this and `recommendations` (`tables.current_recommendations`).
LIVE_RECOMMENDATIONS = "live_recommendations"
# The recommend stage's plan, one row per catalogue item (`core.serving`): what `sparkrec serve` lists customers with.
SERVING_ITEMS = "serving_items"
TABLES = (
    EVENTS_RAW,
    INTERACTIONS,
    QUARANTINE,
    USER_IDS,
    ITEM_IDS,
    ITEMS,
    USER_FACTORS,
    ITEM_FACTORS,
    RECOMMENDATIONS,
    SIMILAR_ITEMS,
    WEIGHTS,
    CLEAN_STATE,
    CLEAN_SURVIVORS,
    CLEAN_USER_DAYS,
    CLEAN_ITEM_LATEST,
    RUNS,
    ERASURES,
    LIVE_RECOMMENDATIONS,
    SERVING_ITEMS,
)

# Columns of the weight table and the clean state.
EVENTS = "events"
VALUE = "value"
LOG2_DECAYED = "log2_decayed"
DEDUP_GROUP = "dedup_group"
DAY = "day"
HASH_CODE = "hash_code"
# On a change set applied by MERGE (`merges.upsert`, `merges.apply_changes`): true = delete the row with this key.
DROP_FLAG = "_op_drop"

# The ranker a run's evaluation chose, as a file in its directory under `<warehouse>/_rankers/` (LightGBM's text).
RANKER_FILE = "model.txt"
