"""Reasoning steps: the generated text cut into steps as it arrives.

A step ends where a boundary is found in the text: by default a blank line,
or a line break before a line that starts a new step ("Step 3", "3." or
"3)"); ``step_regex`` replaces that rule (a step ends where a match of it
ends). A token belongs to the step in which its text starts; the token whose
text holds the boundary ends its step. A boundary of the default rule that
needs the next line's start ("\\nStep 2") is seen a few tokens late, and the
step it ends is then reported with the token range it really had. The last
step ends with the generation. A step regex may come from a service's
client: it is matched with the ``regex`` module, which lets other threads run
meanwhile and gives up after ``MATCH_TIMEOUT_S`` (a regex that backtracks
exponentially ends its own request, not the service). Each step gets the PPL of its own tokens
(non-finite logprobs count as infinite NLL, as in the tracker), their mean
entropy and their lowest confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import regex

from livepp.core.events import StepEvent
from livepp.core.params import LiveppError

__all__ = ["DEFAULT_STEP_REGEX", "StepSegmenter", "step_rule", "MATCH_TIMEOUT_S"]

MATCH_TIMEOUT_S = 0.1  # for one token's search of its step's text

DEFAULT_STEP_REGEX = r"\n[ \t]*\n|\n(?=[ \t]*(?:Step\s*\d+\b|\d+[.)]\s))"


@dataclass
class _Token:
    index: int
    start: int  # character offset of its text in the step buffer
    text: str
    logprob: float
    entropy: float | None
    confidence: float | None


@dataclass
class StepSegmenter:
    step_regex: str = DEFAULT_STEP_REGEX
    _tokens: list[_Token] = field(default_factory=list)
    _text: str = ""
    _count: int = 0

    def __post_init__(self) -> None:
        try:
            self._pattern = regex.compile(self.step_regex, flags=regex.VERSION0)  # re's syntax
        except regex.error as exc:
            raise LiveppError(f"--step-regex {self.step_regex!r} is not a regular expression: {exc}") from None
        if self._pattern.match(""):
            raise LiveppError(f"--step-regex {self.step_regex!r} matches the empty text; it would cut every token")

    def add(self, index: int, text: str, logprob: float, entropy: float | None, confidence: float | None) -> list[StepEvent]:
        """Take one token; the steps it ends (usually none)."""
        self._tokens.append(_Token(index, len(self._text), text, logprob, entropy, confidence))
        self._text += text
        done = []
        while True:
            try:
                m = next((m for m in self._pattern.finditer(self._text, concurrent=True, timeout=MATCH_TIMEOUT_S) if m.end() > 0), None)
            except TimeoutError:
                raise LiveppError(f"the step regex {self.step_regex!r} took over {MATCH_TIMEOUT_S:g} s on a step of "
                                  f"{len(self._text)} characters: it backtracks too much") from None
            # A boundary inside the first token's text does not end an empty step.
            if m is None or not self._tokens:
                return done
            cut = next((k for k, tok in enumerate(self._tokens) if tok.start >= m.end()), len(self._tokens))
            if cut == 0:
                return done
            done.append(self._emit(self._tokens[:cut]))
            rest = self._tokens[cut:]
            offset = rest[0].start if rest else len(self._text)
            self._text = self._text[offset:]
            self._tokens = [_Token(t.index, t.start - offset, t.text, t.logprob, t.entropy, t.confidence) for t in rest]
            if not rest:
                return done

    def finish(self) -> StepEvent | None:
        """The step still open when the generation ends, if it has a token."""
        if not self._tokens:
            return None
        step = self._emit(self._tokens)
        self._tokens, self._text = [], ""
        return step

    def _emit(self, tokens: list[_Token]) -> StepEvent:
        nlls = [-t.logprob if math.isfinite(t.logprob) else math.inf for t in tokens]
        mean_nll = sum(max(x, 0.0) for x in nlls) / len(nlls)
        entropies = [t.entropy for t in tokens if t.entropy is not None]
        confidences = [t.confidence for t in tokens if t.confidence is not None]
        step = StepEvent(
            index=self._count, start_token=tokens[0].index, end_token=tokens[-1].index, text="".join(t.text for t in tokens),
            ppl=math.exp(mean_nll) if math.isfinite(mean_nll) else math.inf,
            mean_entropy=sum(entropies) / len(entropies) if entropies else None,
            min_confidence=min(confidences) if confidences else None,
        )
        self._count += 1
        return step


def step_rule(value: bool | str | None, *, max_length: int | None = None) -> str | None:
    """The step regex a request or command asks for: true the default rule,
    false or nothing no steps, a string that regex (at most ``max_length``
    characters). Checked now, so a bad one is the caller's error before any
    compute."""
    if value is None or value is False:
        return None
    if value is True:
        return DEFAULT_STEP_REGEX
    if not isinstance(value, str) or (max_length is not None and len(value) > max_length):
        bound = f" of at most {max_length} characters" if max_length is not None else ""
        raise LiveppError(f"steps must be true, false or a step regex{bound}")
    StepSegmenter(value)
    return value
