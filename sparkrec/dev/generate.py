"""A synthetic shop: realistic clickstream with dirt injected at known rates, written without Spark.

Every value is a pure function of (seed, row index, purpose), computed with a
64-bit integer hash in numpy, so the output is identical for a seed whatever
the chunking, and `sparkrec generate` needs no JVM: it only writes files.

What it models:
- users with a favourite category (taste clusters) and skewed activity;
- Zipf-like item popularity, globally and within each category;
- a view -> cart -> purchase funnel: each "touch" of a user on an item is
  three consecutive events, going deeper with decreasing probability;
  some purchases come with a rating;
- event type synonyms (`page_view`, `add_to_cart`, `order`) as real logs have;
- dirt: exact duplicate lines, replays of an event id, null/blank ids,
  unknown event types, unparsable and future timestamps, negative quantities,
  malformed JSON lines, and three bot users with absurd activity on one day.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np

from sparkrec.core import columns as C

log = logging.getLogger(__name__)

# Injected dirt: share of lines, applied in this order (cumulative thresholds).
DIRT_RATES = {
    "exact_duplicate": 0.010,
    "replay": 0.005,
    "null_user": 0.004,
    "blank_user": 0.003,
    "null_item": 0.003,
    "unknown_event_type": 0.004,
    "unparsable_timestamp": 0.003,
    "future_timestamp": 0.002,
    "negative_quantity": 0.003,
    "malformed_line": 0.002,
}
BOT_USERS = 3
BOT_EVENTS_PER_DAY = 400  # at least; the default clean threshold is 300 a day
SYNONYMS = {C.VIEW: ["view", "page_view"], C.CART: ["cart", "add_to_cart"], C.PURCHASE: ["purchase", "order"]}
# Lines per output file (and per chunk held in memory while generating).
CHUNK = 1_000_000


@dataclass(frozen=True)
class GenerateParams:
    events: int
    seed: int = 42
    start: date = date(2025, 6, 1)
    days: int = 120

    @property
    def n_users(self) -> int:
        return max(50, self.events // 40)

    @property
    def n_items(self) -> int:
        return min(200_000, max(40, self.events // 100))

    @property
    def n_categories(self) -> int:
        return max(2, min(12, self.n_items // 10))

    @property
    def bot_share(self) -> float:
        return min(0.15, max(0.002, BOT_USERS * BOT_EVENTS_PER_DAY / self.events))


def _key(seed: int, salt: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(f"{seed}:{salt}".encode(), digest_size=8).digest(), "little"))


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection on 64-bit integers that scatters neighbouring inputs."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _hash(seed: int, salt: str, idx: np.ndarray) -> np.ndarray:
    """A 64-bit hash of (seed, salt, idx): the generator's only source of randomness."""
    with np.errstate(over="ignore"):
        return _mix(_mix(np.asarray(idx).astype(np.uint64) ^ _key(seed, salt)) + _key(seed, salt + "/2"))


def _u(seed: int, salt: str, idx: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) from (seed, salt, idx)."""
    return (_hash(seed, salt, idx) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _pick(u: np.ndarray, options: list[str]) -> np.ndarray:
    return np.asarray(options, dtype=object)[np.minimum((u * len(options)).astype(np.int64), len(options) - 1)]


def _iso(seconds: np.ndarray) -> list[str]:
    return [datetime.fromtimestamp(int(s), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") for s in np.floor(seconds)]


def event_lines(p: GenerateParams, start: int = 0, stop: int | None = None) -> list[str]:
    """The JSON lines of events [start, stop): the same lines whatever range they are asked for in."""
    stop = p.events if stop is None else min(stop, p.events)
    i = np.arange(start, stop, dtype=np.int64)
    if not len(i):
        return []
    s = p.seed
    n_cat = p.n_categories
    per_cat = max(1, p.n_items // n_cat)
    start_s = datetime(p.start.year, p.start.month, p.start.day, tzinfo=timezone.utc).timestamp()

    dirt_u = _u(s, "dirt", i)
    flags: dict[str, np.ndarray] = {}
    acc = 0.0
    for name, rate in DIRT_RATES.items():
        flags[name] = (dirt_u >= acc) & (dirt_u < acc + rate) & (i > 0)
        acc += rate

    # A duplicate or replay repeats the previous line's event.
    src = np.where(flags["exact_duplicate"] | flags["replay"], i - 1, i)
    t, pos = src // 3, src % 3
    user_rank = np.floor(_u(s, "user", t) ** 2.0 * p.n_users).astype(np.int64)
    fav = (_hash(s, "fav", user_rank) % np.uint64(n_cat)).astype(np.int64)
    in_cat = _u(s, "incat", t) < 0.75
    k_in = np.minimum(np.floor(float(per_cat) ** _u(s, "item_c", t)) - 1, per_cat - 1).astype(np.int64)
    r_all = np.minimum(np.floor(float(p.n_items) ** _u(s, "item_g", t)) - 1, p.n_items - 1).astype(np.int64)
    item = np.where(in_cat, fav + n_cat * k_in, r_all)
    depth_u = _u(s, "depth", t)
    depth = np.where(depth_u < 0.6, 0, np.where(depth_u < 0.8, 1, 2))
    etype = np.full(len(i), C.VIEW, dtype=object)
    etype[(pos == 1) & (depth >= 1)] = C.CART
    etype[(pos == 2) & (depth == 2)] = C.PURCHASE
    purchase = etype == C.PURCHASE
    rated = purchase & (_u(s, "rate", t) < 0.15)
    ts = (
        start_s + _u(s, "ts", t) * (p.days * 86400.0)
        + pos * (30 + np.floor(_u(s, "gap", src) * 270))
        + np.where(flags["replay"], 5.0, 0.0)
    )
    stars = _u(s, "stars", t)
    rating = np.where(in_cat, 4 + np.floor(stars * 2), 1 + np.floor(stars * 4)).astype(np.int64)
    quantity = (1 + np.floor(_u(s, "qty", t) * 3)).astype(np.int64)
    price = 1 + (_hash(s, "price", item) % np.uint64(5000)).astype(np.int64) / 100.0

    syn_u = _u(s, "syn", src)
    event_type = np.where(rated, C.RATING_EVENT, etype).astype(object)
    for canonical, names in SYNONYMS.items():
        mask = (event_type == canonical)
        event_type[mask] = _pick(syn_u[mask], names)
    # Bots: a few users who view thousands of items on one day.
    is_bot = _u(s, "bot", src) < p.bot_share
    bot_day = start_s + 86400.0 * min(10, p.days - 1)
    bot_ts = bot_day + _u(s, "bot_ts", src) * 86000.0

    iso = _iso(np.where(is_bot, bot_ts, ts))
    lines = []
    for k in range(len(i)):
        rec: dict[str, object] = {"event_id": f"e{src[k]:010d}"}
        if flags["null_user"][k]:
            pass
        elif flags["blank_user"][k]:
            rec["user_id"] = "  "
        elif is_bot[k]:
            rec["user_id"] = f"bot_{src[k] % BOT_USERS}"
        else:
            rec["user_id"] = f"u{user_rank[k]:07d}"
        if not flags["null_item"][k]:
            rec["item_id"] = f"i{item[k]:06d}"
        if flags["unknown_event_type"][k]:
            rec["event_type"] = "hover"
        elif is_bot[k]:
            rec["event_type"] = "view"
        elif flags["negative_quantity"][k]:
            rec["event_type"] = "purchase"
        else:
            rec["event_type"] = event_type[k]
        if flags["unparsable_timestamp"][k]:
            rec["timestamp"] = "not-a-date"
        elif flags["future_timestamp"][k]:
            rec["timestamp"] = "2099-01-01T00:00:00Z"
        else:
            rec["timestamp"] = iso[k]
        if rated[k] and not is_bot[k]:
            rec["rating"] = int(rating[k])
        if flags["negative_quantity"][k]:
            rec["quantity"] = -2
        elif purchase[k] and not is_bot[k]:
            rec["quantity"] = int(quantity[k])
        rec["price"] = round(float(price[k]), 2)
        line = json.dumps(rec, separators=(",", ":"))
        lines.append(line[:25] + " <truncated" if flags["malformed_line"][k] else line)
    return lines


# Item names a shopper could search for: a colour, a material or style, and a thing of the item's category
# (one list of things per category, so a word like "mug" finds mostly one category, as in a real shop).
COLOURS = ("red", "blue", "green", "white", "black", "pink", "yellow", "grey", "ivory", "teal", "orange", "silver")
STYLES = ("vintage", "enamel", "ceramic", "wooden", "glass", "paper", "cotton", "metal", "retro", "floral", "polka dot",
          "jumbo", "mini", "rustic", "scandi", "striped")
THINGS = (
    ("mug", "teapot", "cake stand", "jug", "bowl", "lunch box"),
    ("lantern", "candle holder", "fairy lights", "lamp", "tealight", "star light"),
    ("bag", "tote", "purse", "wash bag", "shopper", "backpack"),
    ("notebook", "pencil case", "card", "wrapping paper", "sticker set", "diary"),
    ("doormat", "cushion", "throw", "clock", "mirror", "picture frame"),
    ("garden sign", "plant pot", "watering can", "bird feeder", "trowel", "seed tin"),
    ("tea towel", "apron", "oven glove", "napkins", "placemat", "coasters"),
    ("bunting", "party cups", "balloons", "cake cases", "party bags", "candles"),
    ("necklace", "bracelet", "earrings", "hair clip", "brooch", "ring box"),
    ("toy car", "jigsaw", "skipping rope", "colouring set", "doll", "spinning top"),
    ("bath mat", "soap dish", "toothbrush holder", "towel", "shower cap", "wash mitt"),
    ("bauble", "stocking", "advent calendar", "wreath", "tree topper", "snow globe"),
)


def item_rows(p: GenerateParams) -> list[tuple[str, str, str, str, str]]:
    """(item_id, category, price, available, name) for every item, as the CSV holds them."""
    i = np.arange(p.n_items, dtype=np.int64)
    price = 1 + (_hash(p.seed, "price", i) % np.uint64(5000)).astype(np.int64) / 100.0
    available = _u(p.seed, "avail", i) < 0.95
    colour = _hash(p.seed, "colour", i) % np.uint64(len(COLOURS))
    style = _hash(p.seed, "style", i) % np.uint64(len(STYLES))
    thing = _hash(p.seed, "thing", i) % np.uint64(len(THINGS[0]))
    return [
        (f"i{k:06d}", f"cat_{k % p.n_categories:02d}", f"{price[k]:.2f}", "true" if available[k] else "false",
         f"{COLOURS[colour[k]]} {STYLES[style[k]]} {THINGS[k % p.n_categories % len(THINGS)][thing[k]]}".capitalize())
        for k in range(p.n_items)
    ]


def generate(p: GenerateParams, out: str) -> dict[str, object]:
    """Write `events/` (JSON lines), `items/` (CSV) and `manifest.json` under `out`, replacing what was there.

    Example:
        generate(GenerateParams(events=100_000, seed=7), "data/generated")
    """
    if p.events < 1:
        raise ValueError("events must be at least 1")
    root = Path(out)
    log.info("generating %s events for %s users and %s items into %s", f"{p.events:,}", f"{p.n_users:,}", f"{p.n_items:,}", out)
    for sub in ("events", "items"):
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir(parents=True)
    for n, start in enumerate(range(0, p.events, CHUNK)):
        lines = event_lines(p, start, start + CHUNK)
        (root / "events" / f"part-{n:05d}.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
        if p.events > CHUNK:
            log.info("generated %s of %s events", f"{min(start + CHUNK, p.events):,}", f"{p.events:,}")
    rows = item_rows(p)
    (root / "items" / "part-00000.csv").write_text(
        "item_id,category,price,available,name\n" + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8"
    )
    manifest = {
        "params": {**asdict(p), "start": p.start.isoformat()},
        "users": p.n_users,
        "items": p.n_items,
        "categories": p.n_categories,
        "dirt_rates": DIRT_RATES,
        "bot_users": BOT_USERS,
        "bot_share": p.bot_share,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
