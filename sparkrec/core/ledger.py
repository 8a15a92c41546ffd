"""The cleaning ledger: every input row accounted for, as plain arithmetic.

`clean` counts its classified rows per (outcome, reason, duplicate kind);
this module adds them up and checks that rows in = kept + quarantined +
duplicates, and that Delta wrote exactly the rows the counts say. No Spark
here, so the arithmetic is tested on its own in milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sparkrec.core.errors import StageError

# Outcomes of classification (the `_outcome` column of `clean`).
KEPT, QUARANTINED, DUPLICATED = "kept", "quarantined", "duplicate"


@dataclass(frozen=True)
class Ledger:
    rows_in: int
    kept: int
    quarantined: int
    duplicates: int
    reasons: dict[str, int] = field(default_factory=dict)
    duplicate_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return self.rows_in == self.kept + self.quarantined + self.duplicates

    def as_dict(self) -> dict[str, int]:
        return {"rows_in": self.rows_in, "kept": self.kept, "quarantined": self.quarantined, "duplicates": self.duplicates}


def tally(rows_in: int, counts: Iterable[Mapping[str, object]]) -> Ledger:
    """Add up count rows with keys `outcome`, `reason`, `duplicate`, `count` into a ledger."""
    by_outcome: dict[str, int] = {}
    reasons: dict[str, int] = {}
    kinds: dict[str, int] = {}
    for row in counts:
        outcome, n = str(row["outcome"]), int(row["count"])  # type: ignore[call-overload]
        by_outcome[outcome] = by_outcome.get(outcome, 0) + n
        if row.get("reason"):
            reasons[str(row["reason"])] = reasons.get(str(row["reason"]), 0) + n
        if outcome == DUPLICATED and row.get("duplicate"):
            kinds[str(row["duplicate"])] = kinds.get(str(row["duplicate"]), 0) + n
    return Ledger(rows_in, by_outcome.get(KEPT, 0), by_outcome.get(QUARANTINED, 0), by_outcome.get(DUPLICATED, 0), reasons, kinds)


def check(ledger: Ledger, written_kept: int | None, written_quarantined: int | None) -> None:
    """Raise when rows are unaccounted for, or when Delta wrote other counts than the ledger's.

    `written_*` are Delta's own commit counts; both None means they were not
    available (nothing to compare), which is not an error.

    Raises:
        StageError: naming every figure, so the mismatch can be traced.
    """
    written = (written_kept, written_quarantined)
    if ledger.balanced and written in ((ledger.kept, ledger.quarantined), (None, None)):
        return
    raise StageError(
        f"ledger does not balance: {ledger.rows_in:,} rows in, {ledger.kept:,} kept ({written_kept} written), "
        f"{ledger.quarantined:,} quarantined ({written_quarantined} written), {ledger.duplicates:,} duplicates"
    )


def guard(ledger: Ledger, previous_share: float | None, min_ratio: float | None, table: str = "interactions") -> None:
    """Refuse, before anything is written, a clean that would throw away the data the warehouse has.

    A run that keeps nothing of a non-empty input, or whose kept share falls
    below `min_ratio` x the previous clean's, is far likelier a wrong rule or
    config (a `min_event_time` in the future, a too-wide `non_product_items`)
    than bad data: publishing it would replace `table` with (almost) nothing.

    Raises:
        StageError: naming the shares and the main quarantine reasons.
    """
    if ledger.rows_in == 0:
        return
    share = ledger.kept / ledger.rows_in
    if ledger.kept == 0:
        why = f"this run would keep none of its {ledger.rows_in:,} rows"
    elif previous_share and min_ratio is not None and share < previous_share * min_ratio:
        why = (f"this run would keep {share:.1%} of its rows against {previous_share:.1%} in the previous clean "
               f"(below clean.min_kept_ratio={min_ratio:g} of it)")
    else:
        return
    top = sorted(ledger.reasons.items(), key=lambda kv: -kv[1])[:3]
    reasons = ", ".join(f"{reason} {n:,}" for reason, n in top) or "none"
    raise StageError(
        f"clean refused to publish: {why}; main quarantine reasons: {reasons}. "
        f"'{table}' and 'quarantine' were left as they were. Check the clean.* settings "
        "(set clean.min_kept_ratio=null to publish such a run anyway)"
    )
