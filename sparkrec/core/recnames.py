"""Names shared by the parts of the recommend stage: working columns and explanation wording.

The parts (catalogue, scoring, fallbacks, lists, similar items) pass DataFrames
to one another with these columns; keeping the names here means no part has
to import another just to know a column's name. They live in the core because
the block kernel (`core.block`) reads the same columns and writes the same
wording without Spark.
"""

from __future__ import annotations

from sparkrec.core import columns as C

EXCLUDED = "_excluded"
HIST = "_hist"
HIST_TYPE = "_hist_type"
CAT = "_cat"
BOOST = "_boost"
ALLOWED = "_allowed"
PRIO = "_prio"
BECAUSE_IDX = "_because_idx"
BECAUSE_TYPE = "_because_type"
# An item's additive score in a hybrid list (recent popularity, 0..1).
BLEND = "_blend"
# The user's own strongest event on the recommended item itself (-1: none): a reminder, not a discovery.
OWN_TYPE = "_own_type"
# Model rows scored elsewhere (a chunked catalogue), handed to the list assembly: array<struct<rank, item_idx, score, _cat>>.
PRESENT = "_present"
# Category codes of the items a user touched (the category fallback).
TOUCHED = "_touched"
# What the ranker (`core.ranker`) needs of a customer: their items, the days since they last touched each,
# and their activity (`ranker.USER_FEATURES`).
RK_ITEMS = "_rk_items"
RK_AGE = "_rk_age"
RK_USER = "_rk_user"
SCORED_SCHEMA = (
    f"{C.USER_IDX} int, {C.ITEM_IDX} int, {C.RANK} int, {C.SCORE} float, {CAT} int, {BECAUSE_IDX} int, "
    f"{BECAUSE_TYPE} int, {OWN_TYPE} int"
)
# Strength of an event type, to say "bought" rather than "viewed" when a user did both.
TYPE_STRENGTH = {C.PURCHASE: 3, C.CART: 2, C.RATING_EVENT: 1, C.VIEW: 0}
VERBS = {3: "bought", 2: "added to your cart", 1: "rated", 0: "viewed"}
# What a reminder says, by the user's own strongest event on the item.
REMINDERS = {3: "you bought this before", 2: "in your cart", 1: "you rated this", 0: "you viewed this"}
# History items per user considered for an explanation (strongest and latest first).
EXPLAIN_HISTORY = 50
