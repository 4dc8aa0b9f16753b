"""Reading LLaVA-RLHF record files, and the bad-input report.

Bad input (a record with missing fields, a preference not 1/2, roles that do not alternate,
an empty conversation, a missing or corrupt image, a sequence too long to keep its image)
is never fatal by default: the record is skipped, a warning names the file, the record
index and the reason, and `DataReport` counts it (each record once, however many epochs see
it). In strict mode the first bad record raises `BadRecord` instead.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
from typing import Any, Iterator, Mapping

logger = logging.getLogger("llava_jax.data")

# Caption types of RL prompts (LLaVA-RLHF): 1 general, 2-5 multiple choice with answer
# A/B/C/D, 6 yes/no with answer "No", 7 yes/no with answer "Yes".
CAPTION_TYPE_ANSWERS = {1: None, 2: "A", 3: "B", 4: "C", 5: "D", 6: "No", 7: "Yes"}
MULTIPLE_CHOICE_TYPES = (2, 3, 4, 5)


def correctness(response: str, caption_type: int) -> float:
    """LLaVA-RLHF's symbolic correctness of a response for the item's caption type."""
    answer = CAPTION_TYPE_ANSWERS[int(caption_type)]
    text = response.strip()
    if answer in ("A", "B", "C", "D"):
        return 1.0 if text.startswith(f"{answer}.") or f"correct option is {answer}." in text else 0.0
    if answer == "No":
        return 0.5 if text.startswith("No") else -0.5 if text.startswith("Yes") else 0.0
    return 0.0  # general items and "Yes" answers earn nothing (as the original)


class BadRecord(ValueError):
    """Raised in strict mode: names the file, the record index and the reason."""

    def __init__(self, reason: str, source: str, index: int, message: str):
        super().__init__(f"{source}[{index}]: {reason}: {message}")
        self.reason, self.source, self.index = reason, source, index


class DataReport:
    """Counts of used, skipped (by reason) and truncated records; thread-safe."""

    max_warnings_per_reason = 20  # then one "suppressed" line, so a bad set cannot flood logs

    def __init__(self, source: str, strict: bool = False):
        self.source = source
        self.strict = strict
        self.total = 0
        self._skipped: dict[str, set[int]] = collections.defaultdict(set)
        self._truncated: set[int] = set()
        self._lock = threading.Lock()

    def skip(self, reason: str, index: int, message: str) -> None:
        """Records a bad record; raises BadRecord in strict mode."""
        if self.strict:
            raise BadRecord(reason, self.source, index, message)
        with self._lock:
            seen = self._skipped[reason]
            if index in seen:
                return
            seen.add(index)
            n = len(seen)
        if n <= self.max_warnings_per_reason:
            logger.warning("skipping %s record %d (%s): %s", self.source, index, reason, message)
        elif n == self.max_warnings_per_reason + 1:
            logger.warning("further %r warnings for %s suppressed; see the summary", reason, self.source)

    def truncated(self, index: int) -> None:
        with self._lock:
            self._truncated.add(index)

    @property
    def skipped(self) -> dict[str, int]:
        with self._lock:
            return {reason: len(idx) for reason, idx in sorted(self._skipped.items()) if idx}

    @property
    def num_truncated(self) -> int:
        return len(self._truncated)

    def summary(self) -> str:
        skipped = self.skipped
        parts = ", ".join(f"{k}={v}" for k, v in skipped.items()) or "none"
        return (f"{self.source}: {self.total} records, {sum(skipped.values())} skipped ({parts}), "
                f"{self.num_truncated} truncated")


def read_records(path: str, report: DataReport) -> Iterator[tuple[int, Any]]:
    """Yields (index, record) from a JSON list or a JSONL file (index = position / line)."""
    if path.endswith(".jsonl"):
        with open(path) as f:
            index = -1
            for line in f:
                if not line.strip():
                    continue
                index += 1
                report.total += 1
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    report.skip("invalid_json", index, str(e))
                    continue
                yield index, record
        return
    with open(path) as f:
        data = json.load(f)  # a broken JSON list is a broken file, not a bad record: raise
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    report.total = len(data)
    yield from enumerate(data)


def check_record(record: Any, report: DataReport, index: int, required: Mapping[str, type | tuple]) -> bool:
    """True if `record` is a dict whose `required` fields exist with the given types."""
    if not isinstance(record, dict):
        report.skip("missing_field", index, f"record is a {type(record).__name__}, not an object")
        return False
    for name, kind in required.items():
        value = record.get(name)
        if value is None or not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            report.skip("missing_field", index, f"field {name!r} missing or not {getattr(kind, '__name__', kind)}")
            return False
    if record.get("image") is not None and not isinstance(record["image"], str):
        report.skip("missing_field", index, "field 'image' is not a string")
        return False
    return True


def load_captions(path: str) -> dict[str, list[str]]:
    """The captions map `{image file name: [caption, ...], "aok_" + name: [rationale, ...]}`."""
    with open(path) as f:
        captions = json.load(f)
    if not isinstance(captions, dict):
        raise ValueError(f"{path}: the captions map must be a JSON object")
    return {str(k): [str(c) for c in v] for k, v in captions.items()}


def caption_key(image: str, caption_type: int = 1) -> str:
    """The captions-map key of an image: `"aok_" + name` for multiple-choice (A-OKVQA) items."""
    name = os.path.basename(image)
    return "aok_" + name if caption_type in MULTIPLE_CHOICE_TYPES else name


def lookup_captions(captions: Mapping[str, list[str]], image: str, caption_type: int = 1) -> list[str] | None:
    """Captions of `image` for an item of `caption_type`, or None if the map has no entry."""
    prefix = "aok_" if caption_type in MULTIPLE_CHOICE_TYPES else ""
    for name in dict.fromkeys((os.path.basename(image), image)):  # bare file name first
        found = captions.get(prefix + name)
        if found is not None:
            return list(found)
    return None
