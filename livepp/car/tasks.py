"""Built-in labelled questions (no download) and the answer matcher.

Every answer is computed, not stored: sums, products, unit conversions, and a
small table of capitals. ``builtin_split(name, split)`` returns a fixed,
shuffled half of a task ("calib" or "eval"); the two halves never share a
question, so a calibration is always evaluated on questions it did not see.

The matcher (documented in the README): a reply is correct when
* the accepted answer is a number and the *last* number in the reply equals
  it (the model often restates the question: "3 + 4 = 7"). Numbers are read
  as written: a comma is a thousands separator only between valid groups
  ("1,234" is 1234; "1,2,3" is three numbers, the last 3); a minus sign makes
  a number negative only when it does not join two numbers ("-5" and "= -5"
  are −5; "3-4" is 3 and 4); "7.0" equals "7";
* otherwise, the accepted answer, normalised (lower case, punctuation and
  accents folded, extra spaces removed, a leading "the"/"a"/"an" dropped), occurs in the
  normalised reply as whole words.
"""

from __future__ import annotations

import random
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from livepp.core.jsonl import iter_jsonl
from livepp.core.params import LiveppError

__all__ = ["Question", "answer_matches", "builtin_split", "load_questions", "TASKS", "last_number"]


@dataclass(frozen=True, slots=True)
class Question:
    question: str
    answers: tuple[str, ...]


_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Mexico": "Mexico City", "India": "New Delhi",
    "Kenya": "Nairobi", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw",
    "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna", "Hungary": "Budapest",
    "Turkey": "Ankara", "Iran": "Tehran", "Peru": "Lima", "Chile": "Santiago", "Colombia": "Bogota",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul", "Indonesia": "Jakarta",
    "Nigeria": "Abuja", "Morocco": "Rabat", "Switzerland": "Bern", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Denmark": "Copenhagen", "Czech Republic": "Prague", "Romania": "Bucharest",
    "Ukraine": "Kyiv", "Pakistan": "Islamabad", "Saudi Arabia": "Riyadh", "New Zealand": "Wellington",
    "Cuba": "Havana", "Venezuela": "Caracas", "Ethiopia": "Addis Ababa", "Iraq": "Baghdad", "Israel": "Jerusalem",
}


def _one_digit_sums() -> list[Question]:
    return [Question(f"What is {a} + {b}?", (str(a + b),)) for a in range(1, 10) for b in range(1, 10)]


def _one_digit_products() -> list[Question]:
    return [Question(f"What is {a} * {b}?", (str(a * b),)) for a in range(2, 10) for b in range(2, 10)]


def _two_digit_sums() -> list[Question]:
    rng = random.Random(2)
    pairs = {(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(120)}
    return [Question(f"What is {a} + {b}?", (str(a + b),)) for a, b in sorted(pairs)]


def _units() -> list[Question]:
    out = []
    for n in range(1, 13):
        out.append(Question(f"How many centimeters are in {n} meters?", (str(100 * n),)))
        out.append(Question(f"How many minutes are in {n} hours?", (str(60 * n),)))
        out.append(Question(f"How many grams are in {n} kilograms?", (str(1000 * n),)))
        out.append(Question(f"How many days are in {n} weeks?", (str(7 * n),)))
    return out


def _capitals() -> list[Question]:
    return [Question(f"What is the capital of {c}?", (city,)) for c, city in _CAPITALS.items()]


TASKS = {
    "sums": _one_digit_sums,
    "products": _one_digit_products,
    "two-digit-sums": _two_digit_sums,
    "units": _units,
    "capitals": _capitals,
}
SPLITS = ("calib", "eval")


def builtin_split(task: str, split: str) -> list[Question]:
    """Half of a built-in task: ``calib`` or ``eval`` (disjoint, fixed order)."""
    if task == "mixed":  # every task's half, interleaved so a prefix mixes tasks
        parts = [builtin_split(t, split) for t in TASKS]
        return [q for row in zip(*parts) for q in row] + [q for p in parts for q in p[min(map(len, parts)):]]
    if task not in TASKS:
        raise LiveppError(f"unknown built-in task {task!r}; choose one of {', '.join(TASKS)}, mixed")
    if split not in SPLITS:
        raise LiveppError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    items = TASKS[task]()
    random.Random(f"livepp:{task}").shuffle(items)
    half = len(items) // 2
    return items[:half] if split == "calib" else items[half:]


def load_questions(source: str, *, limit: int | None = None) -> list[Question]:
    """Questions from a JSONL file, or ``builtin:TASK[:SPLIT]`` (split defaults to calib)."""
    if source.startswith("builtin:"):
        parts = source.split(":")
        if len(parts) not in (2, 3):
            raise LiveppError("use builtin:TASK or builtin:TASK:SPLIT, e.g. builtin:sums:calib")
        items = builtin_split(parts[1], parts[2] if len(parts) == 3 else "calib")
    else:
        items = list(_read_jsonl(Path(source)))
    if not items:
        raise LiveppError(f"{source} holds no questions")
    return items[:limit] if limit else items


def _read_jsonl(path: Path) -> Iterable[Question]:
    if not path.is_file():
        raise LiveppError(f"no such file: {path}")
    for where, rec in iter_jsonl(path.read_text(encoding="utf-8"), str(path)):
        q = rec.get("question") if isinstance(rec, dict) else None
        answers = rec.get("answers") if isinstance(rec, dict) else None
        if isinstance(answers, (str, int, float)):
            answers = [answers]
        if not isinstance(q, str) or not q.strip() or not isinstance(answers, list) or not answers:
            raise LiveppError(f'{where}: need {{"question": str, "answers": [accepted answers]}}')
        yield Question(q, tuple(str(a) for a in answers))


# A number starts where no digit, letter or point is just before it; its sign
# counts only when no letter/digit is just before the sign ("3-4" is a range).
_NUMBER = re.compile(r"(?<![0-9A-Za-z_.])(?:(?<![0-9A-Za-z_])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])")
_ARTICLES = re.compile(r"^(the|a|an)\s+")


def last_number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _as_number(text: str) -> float | None:
    t = text.strip().replace(",", "")
    try:
        return float(t)
    except ValueError:
        return None


def _normalise(text: str) -> str:
    # Fold accents ("Bogotá" matches "Bogota"), then drop punctuation.
    t = "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))
    t = re.sub(r"[^\w\s]", " ", t)
    t = " ".join(t.split())
    return _ARTICLES.sub("", t)


def answer_matches(reply: str, answers: Iterable[str]) -> bool:
    """True when ``reply`` gives one of the accepted ``answers`` (see module docstring)."""
    norm_reply = f" {_normalise(reply)} "
    for answer in answers:
        number = _as_number(answer)
        if number is not None:
            got = last_number(reply)
            if got is not None and abs(got - number) < 1e-9:
                return True
            continue
        norm = _normalise(answer)
        if norm and f" {norm} " in norm_reply:
            return True
    return False
