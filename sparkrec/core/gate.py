"""The quality gate: from measured results to a verdict, with no Spark in sight.

Kept as a pure function of numbers so the decision (which baseline is the
one to beat, what score is needed, whether the model passed) is testable in
milliseconds and reads the same in the stage, `sparkrec runs` and the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sparkrec.core.config import EvaluateConfig


def metric_key(ev: EvaluateConfig) -> str:
    """The metric that tunes and gates, as it is named in the results: 'ndcg@10'."""
    return f"{ev.metric}@{ev.k}"


@dataclass(frozen=True)
class Verdict:
    metric: str
    model_score: float
    best_baseline: str
    best_score: float
    needed: float
    passed: bool
    lists: str = "model"  # which of the model's lists was judged (`CONTENDERS`)

    @property
    def ratio(self) -> float:
        return self.model_score / self.best_score if self.best_score > 0 else float("inf")


# The model's lists a run may publish: ALS's own top n, or its candidates ordered by the learned ranker.
CONTENDERS = ("model", "ranked")


def contender(results: dict[str, dict[str, float]], metric: str) -> str:
    """Which of the model's lists goes before the gate: the ranked lists only where they beat ALS's own.

    A ranker costs a training per run and a model to keep; it is kept only when it wins on the split.
    """
    if "ranked" in results and "model" in results and results["ranked"][metric] > results["model"][metric]:
        return "ranked"
    return "model"


def verdict(results: dict[str, dict[str, float]], metric: str, margin: float, lists: str = "model") -> Verdict:
    """Judge `results[lists]` (the model's lists, or the ranked ones) against the best baseline on `metric`.

    The model passes when it beats the best baseline by `margin` (0.1: 10% above);
    when every baseline scores 0, any positive score passes.

    Raises:
        ValueError: there is no model result or no baseline to compare with.
    """
    if lists not in results:
        raise ValueError(f"no {lists} result to judge")
    baselines = [n for n in results if n not in CONTENDERS]
    if not baselines:
        raise ValueError("no baseline to judge the model against")
    model_score = results[lists][metric]
    best = max(baselines, key=lambda n: results[n][metric])  # ties: the first listed
    best_score = results[best][metric]
    needed = best_score * (1 + margin)
    passed = model_score > needed if best_score > 0 else model_score > 0
    return Verdict(metric, model_score, best, best_score, needed, passed, lists)


# Baselines the recommend stage can publish, and how: (fallback strategy, source of its rows).
PUBLISHABLE = ("recent_popular", "popular")


@dataclass(frozen=True)
class Decision:
    """What a run publishes after the gate: `model`, `baseline` (which one) or `nothing`."""

    publish: str
    baseline: str | None
    reason: str


def decide(v: Verdict, results: dict[str, dict[str, float]], enabled: bool, on_fail: str, published_before: bool) -> Decision:
    """From the verdict to what is published.

    A losing model publishes the best baseline the recommend stage can build
    (buy-again lists are a measure, not a shop's list) when `on_fail` is
    'baseline', or 'auto' on a warehouse that never published a list.
    """
    if not enabled or v.passed:
        return Decision("model", None, "the gate is off" if not enabled else f"the model beat {v.best_baseline} by the margin")
    lost = (f"model {v.metric} {v.model_score:.4f} does not beat the best baseline "
            f"({v.best_baseline} {v.best_score:.4f}) by the margin (needed > {v.needed:.4f})")
    if on_fail == "keep" or (on_fail == "auto" and published_before):
        why = "" if on_fail == "keep" else " (evaluate.gate.on_fail=auto keeps what was published before)"
        return Decision("nothing", None, lost + why)
    candidates = [n for n in PUBLISHABLE if n in results]
    if not candidates:
        return Decision("nothing", None, lost + "; no publishable baseline was measured")
    best = max(candidates, key=lambda n: results[n][v.metric])
    first = "" if published_before else "; no list was ever published in this warehouse"
    return Decision("baseline", best, lost + first)


def evaluation_line(metrics: dict[str, float], details: dict) -> str:
    """The model against the best baseline on the gate's metric, and the verdict, in one line."""
    key, best = details.get("metric"), details.get("best_baseline")
    if not key or not best:
        return ""
    judged = details.get("lists", "model")
    model, base = metrics.get(f"{judged}.{key}", 0.0), metrics.get(f"{best}.{key}", 0.0)
    ratio = f"x{model / base:.2f}" if base else "baseline 0"
    gate = details.get("gate", {})
    verdict = "passed" if gate.get("passed") else "FAILED"
    published = f"; published the {gate['baseline']} baseline instead" if gate.get("publish") == "baseline" else ""
    ranked = ""
    if f"ranked.{key}" in metrics:
        ranked = (f" (ranked lists {metrics[f'ranked.{key}']:.4f} against ALS's {metrics.get(f'model.{key}', 0.0):.4f}: "
                  + ("the ranker's lists go out)" if judged == "ranked" else "ALS's lists go out)"))
    return (f"{judged} {key} {model:.4f} vs best baseline {best} {base:.4f} ({ratio}){ranked}; gate {verdict}"
            + ("" if gate.get("enabled") else " (gate off)") + published)


def tuning_line(details: dict) -> str:
    """What a tune stage did, in one line: searched (and what won), reused an earlier search, or skipped."""
    if details.get("reused_from"):
        return f"reused the settings tuned by run {details['reused_from']} (tune.reuse_days)"
    if details.get("skipped"):
        return f"not tuned, the configured settings were used: {details['skipped']}"
    trials = details.get("trials") or []
    return f"tuned ({len(trials)} trials): {json.dumps(details.get('best', {}), sort_keys=True)}"
