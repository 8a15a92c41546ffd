"""The quality gate: from measured results to a verdict, with no Spark in sight.

Kept as a pure function of numbers so the decision (which baseline is the
one to beat, what score is needed, whether the model passed) is testable in
milliseconds and reads the same in the stage, `sparkrec runs` and the report.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparkrec.config import EvaluateConfig


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

    @property
    def ratio(self) -> float:
        return self.model_score / self.best_score if self.best_score > 0 else float("inf")


def verdict(results: dict[str, dict[str, float]], metric: str, margin: float) -> Verdict:
    """Judge `results["model"]` against the best of the other lists on `metric`.

    The model passes when it beats the best baseline by `margin` (0.1: 10% above);
    when every baseline scores 0, any positive score passes.

    Raises:
        ValueError: there is no model result or no baseline to compare with.
    """
    if "model" not in results:
        raise ValueError("no model result to judge")
    baselines = [n for n in results if n != "model"]
    if not baselines:
        raise ValueError("no baseline to judge the model against")
    model_score = results["model"][metric]
    best = max(baselines, key=lambda n: results[n][metric])  # ties: the first listed
    best_score = results[best][metric]
    needed = best_score * (1 + margin)
    passed = model_score > needed if best_score > 0 else model_score > 0
    return Verdict(metric, model_score, best, best_score, needed, passed)


def evaluation_line(metrics: dict[str, float], details: dict) -> str:
    """The model against the best baseline on the gate's metric, and the verdict, in one line."""
    key, best = details.get("metric"), details.get("best_baseline")
    if not key or not best:
        return ""
    model, base = metrics.get(f"model.{key}", 0.0), metrics.get(f"{best}.{key}", 0.0)
    ratio = f"x{model / base:.2f}" if base else "baseline 0"
    gate = details.get("gate", {})
    verdict = "passed" if gate.get("passed") else "FAILED"
    return f"model {key} {model:.4f} vs best baseline {best} {base:.4f} ({ratio}); gate {verdict}" + ("" if gate.get("enabled") else " (gate off)")
