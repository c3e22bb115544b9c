"""The answer a reply gives, as votes count it (CAR's vote route, DeepConf).

The order follows the DeepConf reference's ``extract_answer`` and then
livepp's matcher:

1. the content of the last ``\\boxed{...}`` (braces balanced, as the
   reference reads it; ``\\boxed 5$`` without a brace: up to the next ``$``);
2. else the last number of the reply (:func:`livepp.car.tasks.last_number`);
3. else the reply's normalised text (lower case, spaces collapsed, trailing
   ". ! " dropped).

A boxed answer or a text is normalised the same way, and a number is written
in one canonical form ("7.0", "7" and "\\boxed{7}" are all "7"), so equal
answers always fall into one bin of the vote. A reply with nothing to extract
(empty, or ``\\boxed{}``) has no answer: it does not vote.
"""

from __future__ import annotations

import math
import re

from livepp.car.tasks import last_number

__all__ = ["extract_answer", "vote_key"]

_BOXED = "boxed"
_WHOLE_NUMBER = re.compile(r"^\s*-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\s*$")


def _number_key(number: float) -> str:
    # Integers in full ("1234567", not "1.23457e+06": two different answers
    # must never share a key); other floats by their shortest round-trip form.
    if math.isfinite(number) and number.is_integer():
        return str(int(number))
    return repr(number)


def _text_key(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!")


def _boxed(text: str) -> str | None:
    """What the last ``\\boxed`` holds, as the reference reads it; None without one."""
    at = text.rfind(_BOXED)
    if at < 0:
        return None
    rest = text[at + len(_BOXED):]
    if not rest.startswith("{"):
        return rest.split("$")[0].strip()
    depth, out = 1, []
    for c in rest[1:]:
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                break
        out.append(c)
    return "".join(out).strip()


def extract_answer(text: str) -> str | None:
    """The answer ``text`` gives (module docstring), or None when it gives none."""
    boxed = _boxed(text)
    if boxed is not None:
        if _WHOLE_NUMBER.match(boxed):
            return _number_key(float(boxed.replace(",", "")))
        return _text_key(boxed) or None
    number = last_number(text)
    if number is not None:
        return _number_key(number)
    return _text_key(text) or None


def vote_key(text: str) -> str:
    """The answer ``text`` gives, for a plain vote: :func:`extract_answer`, or "" when there is none."""
    return extract_answer(text) or ""
