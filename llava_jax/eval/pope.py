"""POPE scoring, computed as the POPE evaluation does.

An answer counts as "no" when its first sentence (text before the first '.'), with commas
removed and split on spaces, contains the word `No`, `no` or `not`; otherwise "yes".
"yes" is the positive class. Division by zero (e.g. no positive predictions) gives 0.0
instead of an exception, so a degenerate model still gets a report.
"""
from __future__ import annotations

from typing import Iterable, Sequence


def pope_answer(text: str) -> str:
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def pope_scores(answers: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """answers: model texts; labels: "yes"/"no" -> accuracy, precision, recall, f1, yes_ratio."""
    if len(answers) != len(labels):
        raise ValueError(f"{len(answers)} answers for {len(labels)} labels")
    preds = [pope_answer(a) == "yes" for a in answers]
    truth = [label.strip().lower() != "no" for label in labels]
    tp = sum(p and t for p, t in zip(preds, truth))
    fp = sum(p and not t for p, t in zip(preds, truth))
    tn = sum(not p and not t for p, t in zip(preds, truth))
    fn = sum(not p and t for p, t in zip(preds, truth))
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {"accuracy": _ratio(tp + tn, len(preds)), "precision": precision, "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall), "yes_ratio": _ratio(sum(preds), len(preds)),
            "tp": tp, "fp": fp, "tn": tn, "fn": fn, "n": len(preds)}


def pope_by_category(rows: Iterable[tuple[str, str, str]]) -> dict[str, dict[str, float]]:
    """rows of (category, answer, label) -> scores per category plus "all"."""
    groups: dict[str, tuple[list[str], list[str]]] = {}
    for category, answer, label in rows:
        for key in {category or "all", "all"}:
            answers, labels = groups.setdefault(key, ([], []))
            answers.append(answer)
            labels.append(label)
    return {key: pope_scores(*value) for key, value in sorted(groups.items())}
