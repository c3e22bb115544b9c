"""Which tokens of a text are scored, and in which windows: pure planning
(a tokenizer and a context length in, token ids and windows out, no model).
:mod:`livepp.scoring.teacher_forced` computes the numbers of a plan on a
local model; the service scores the same plans as rows of its batch.

Which tokens are scored follows the tokenizer's own rule, as the Hugging Face
guide, LightLLM and lm-evaluation-harness do: a text (or prompt + target) is
tokenized with the tokenizer's default special tokens, ``tokenizer(text)``.
A tokenizer that adds a BOS token (Llama, Gemma) gets every text token scored,
the first conditioned on BOS; one that adds none (SmolLM2, whose ``bos_token``
is the chat marker ``<|im_start|>`` and is not added to plain text) leaves the
first text token unscored, since nothing predicts it. Every result states
its rule in :attr:`ScoreResult.first_token_rule`.

Whole texts can also be scored by lm-evaluation-harness's
``loglikelihood_rolling`` convention (``convention="lm-eval"``): every token is
scored, the first after a prefix token (the tokenizer's BOS, else its EOS,
or a given id); the text is cut into disjoint windows of ``max_length``
predicted tokens, each later window with the one token before it as context,
except the last, which gets a full window of ``max_length`` left context.

Sliding windows follow Hugging Face's "perplexity of fixed-length models"
recipe exactly: windows of ``max_length`` tokens starting every ``stride``
tokens; each window scores only the tokens the previous window did not
reach, each with as much left context as its window holds, and the first
token of a window is never scored by that window (nothing in it predicts it).
So ``stride == max_length`` gives independent chunks, and the corpus value is
the token-weighted mean NLL. Unlike the guide's loop, only the logits of the
scored positions are computed (``logits_to_keep``), and several windows can
share one forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from livepp.core.params import LiveppError

__all__ = ["ScoredToken", "ScoreResult", "Window", "ScorePlan", "plan_windows", "lm_eval_windows", "plan_ids", "plan_text",
           "plan_target", "plan_lm_eval", "target_prefix", "carries_target", "prefix_token_id"]


@dataclass(frozen=True, slots=True)
class ScoredToken:
    token_id: int
    text: str
    logprob: float
    entropy: float


@dataclass
class ScoreResult:
    """Scores of a token sequence. ``tokens`` holds only the scored tokens."""

    tokens: list[ScoredToken]
    first_token_rule: str
    windows: int = 1
    max_length: int | None = None
    stride: int | None = None
    forced_windows: bool = False
    straddling_token: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def sum_nll(self) -> float:
        return math.fsum(-t.logprob for t in self.tokens)

    @property
    def mean_nll(self) -> float:
        return self.sum_nll / self.n_tokens if self.tokens else math.nan

    @property
    def ppl(self) -> float:
        try:
            return math.exp(self.mean_nll)
        except OverflowError:
            return math.inf

    @property
    def bits_per_token(self) -> float:
        return self.mean_nll / math.log(2)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n_tokens": self.n_tokens,
            "mean_nll": self.mean_nll,
            "ppl": self.ppl,
            "bits_per_token": self.bits_per_token,
            "first_token_rule": self.first_token_rule,
            "windows": self.windows,
        }
        if self.max_length is not None:
            out |= {"max_length": self.max_length, "stride": self.stride, "forced_windows": self.forced_windows}
        if self.straddling_token is not None:
            out["straddling_token"] = self.straddling_token
        if self.notes:
            out["notes"] = list(self.notes)
        return out


@dataclass(frozen=True, slots=True)
class Window:
    """Tokens ``[begin, end)`` go in; positions ``[score_from, end)`` are scored."""

    begin: int
    end: int
    score_from: int


def plan_windows(n: int, max_length: int, stride: int) -> list[Window]:
    """The guide's windows over a sequence of ``n`` token positions."""
    if max_length < 2:
        raise LiveppError(f"max_length must be >= 2, got {max_length}")
    if not 1 <= stride <= max_length:
        raise LiveppError(f"stride must be between 1 and max_length ({max_length}), got {stride}")
    windows = []
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        score_from = max(prev_end, begin + 1)
        if score_from < end:
            windows.append(Window(begin, end, score_from))
        prev_end = end
        if end == n:
            break
    return windows


def _added_specials(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """``tokenizer(text)`` and the special ids it put before the text's own."""
    with_specials = [int(i) for i in tokenizer(text)["input_ids"]]
    plain = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    lead = with_specials[: len(with_specials) - len(plain)] if with_specials[len(with_specials) - len(plain):] == plain else []
    return with_specials, lead


def _token_names(tokenizer: Any, ids: list[int]) -> str:
    return " ".join(repr(tokenizer.convert_ids_to_tokens(i)) for i in ids)


def _hf_rule(tokenizer: Any, lead: list[int]) -> str:
    if lead:
        return f"hf: tokenizer(text) adds {_token_names(tokenizer, lead)} before the text; every text token is scored"
    return "hf: tokenizer(text) adds no BOS, so the first text token has no context and is not scored"


def prefix_token_id(tokenizer: Any, prefix: str | int | None = None) -> int:
    """lm-evaluation-harness's prefix token: BOS, else EOS (or as given)."""
    if isinstance(prefix, int):
        return prefix
    if prefix not in (None, "bos", "eos"):
        raise LiveppError(f"prefix token must be bos, eos or a token id, got {prefix!r}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    chosen = eos if prefix == "eos" else bos if prefix == "bos" else (bos if bos is not None else eos)
    if chosen is None:
        raise LiveppError(f"the tokenizer has no {prefix or 'BOS or EOS'} token to use as the prefix; give a token id")
    return int(chosen)


def lm_eval_windows(n_tokens: int, max_length: int) -> list[Window]:
    """lm-evaluation-harness's rolling windows (``get_rolling_token_windows``
    with ``context_len=1`` and ``make_disjoint_window``) over ``[prefix] +
    tokens``, in positions of that sequence: each window feeds ``max_length``
    tokens (fewer for a short text) and scores its disjoint share."""
    if max_length < 1:
        raise LiveppError(f"max_length must be >= 1, got {max_length}")
    windows = []
    first = min(max_length, n_tokens)
    windows.append(Window(0, first + 1, 1))
    predicted = first
    while predicted < n_tokens:
        length = min(n_tokens - predicted, max_length)
        end = predicted + length  # in text-token positions
        windows.append(Window(end - max_length, end + 1, predicted + 1))
        predicted = end
    return windows


def target_prefix(tokenizer: Any, prompt: str, *, chat: bool) -> tuple[str, bool]:
    """(the text before a target, whether tokenizing it adds the tokenizer's
    special tokens): the prompt, or with ``chat`` the prompt as a user turn
    of the chat template, whose text already holds its special tokens."""
    if not chat:
        return prompt, True
    if not getattr(tokenizer, "chat_template", None):
        raise LiveppError("--chat: this model's tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False), False


def carries_target(token_id: int, span: tuple[int, int], boundary: int, special_ids: set[int]) -> bool:
    """Whether a token of ``prefix + target`` carries target text (its span
    ends past the ``boundary``; a zero-width special token does not): the
    first such token is the first target token, straddling or not."""
    start, end = span
    return end > boundary and not (token_id in special_ids and start == end)


@dataclass
class ScorePlan:
    """What to score: ``ids``, the windows that cover positions
    ``score_from`` onward, and how the result is described."""

    ids: list[int]
    windows: list[Window]
    score_from: int
    first_token_rule: str
    max_length: int | None = None
    stride: int | None = None
    forced_windows: bool = False
    straddling_token: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def result(self, scored: dict[int, tuple[float, float]], decode: Callable[[list[int]], str]) -> ScoreResult:
        """The result from ``{position: (logprob, entropy)}`` of every scored position."""
        ids = self.ids
        return ScoreResult(
            tokens=[ScoredToken(ids[p], decode([ids[p]]), *scored[p]) for p in range(self.score_from, len(ids)) if p in scored],
            first_token_rule=self.first_token_rule, windows=len(self.windows), max_length=self.max_length, stride=self.stride,
            forced_windows=self.forced_windows, straddling_token=self.straddling_token, notes=list(self.notes),
        )


def plan_ids(ids: list[int], context: int, *, score_from: int = 1, max_length: int | None = None, stride: int | None = None,
             first_token_rule: str = "") -> ScorePlan:
    """Positions ``score_from..len(ids)-1`` of ``ids``, teacher-forced.

    Without ``max_length`` the whole sequence is one window, unless it is
    longer than the model's context: then windows of the context length with
    half-context stride are forced, and the result says so.
    """
    if len(ids) < 2 or not 1 <= score_from < len(ids):
        raise LiveppError("nothing to score: the text has no token that can be scored")
    forced = False
    notes = []
    if max_length is None:
        if len(ids) <= context:
            max_length = len(ids)
            stride = max_length
        else:
            forced = True
            max_length, stride = context, context // 2
            notes.append(f"{len(ids)} tokens exceed the model's context of {context}: scored with sliding windows of {max_length}, stride {stride}")
    elif max_length > context:
        raise LiveppError(f"max_length {max_length} exceeds the model's context of {context} tokens")
    if stride is None:
        stride = max_length
    # Positions before score_from (a target's prompt) are context only: no
    # window scores them, and windows that would score nothing else are skipped.
    windows = [Window(w.begin, w.end, max(w.score_from, score_from)) for w in plan_windows(len(ids), max_length, stride)
               if w.end > max(w.score_from, score_from)]
    whole = len(windows) == 1 and windows[0].begin == 0 and windows[0].end == len(ids)
    return ScorePlan(ids, windows, score_from, first_token_rule, None if whole and not forced else max_length,
                     None if whole and not forced else stride, forced, notes=notes)


def plan_text(tokenizer: Any, context: int, text: str, **options: Any) -> ScorePlan:
    """A text by the tokenizer's own rule (the module docstring)."""
    if not isinstance(text, str) or not text.strip():
        raise LiveppError("the text to score is empty")
    ids, lead = _added_specials(tokenizer, text)
    return plan_ids(ids, context, score_from=max(len(lead), 1), first_token_rule=_hf_rule(tokenizer, lead), **options)


def plan_target(tokenizer: Any, context: int, prompt: str, target: str, *, chat: bool = False, **options: Any) -> ScorePlan:
    """``target`` given ``prompt``, the LightLLM recipe.

    Prompt and target are tokenized together (so the target is tokenized as
    it would be in context), the target's tokens are found by character
    offsets, and only those are scored. A token that starts in the prompt and
    ends in the target straddles the boundary: it is scored as a target token
    (it carries target characters) and reported in ``straddling_token``.
    With ``chat``, the prompt is wrapped as a user turn in the chat template
    and the target is the assistant's reply.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise LiveppError("the prompt is empty")
    if not isinstance(target, str) or not target.strip():
        raise LiveppError("the target is empty or only whitespace")
    prefix_text, specials = target_prefix(tokenizer, prompt, chat=chat)
    if chat:
        rule = "the chat template supplies the context; only target tokens are scored"
    else:
        _, lead = _added_specials(tokenizer, prompt)
        rule = (f"hf: prompt + target tokenized together by the tokenizer's own rule ({'adds ' + _token_names(tokenizer, lead) if lead else 'no BOS added'}); "
                "only target tokens are scored, each conditioned on everything before it")
    full = prefix_text + target
    boundary = len(prefix_text)
    enc = tokenizer(full, add_special_tokens=specials, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    special_ids = set(getattr(tokenizer, "all_special_ids", ()))
    first = next((i for i, span in enumerate(offsets) if carries_target(ids[i], span, boundary, special_ids)), None)
    if first is None:
        raise LiveppError("the target produced no tokens")
    if first == 0:
        raise LiveppError("the target starts the sequence, so its first token has no context; give a prompt")
    plan = plan_ids(ids, context, score_from=first, first_token_rule=rule, **options)
    s, e = offsets[first]
    if s < boundary:
        plan.straddling_token = {"index": first, "token_id": ids[first], "text": full[s:e], "prompt_part": full[s:boundary],
                                 "target_part": full[boundary:e]}
        plan.notes.append(f"token {full[s:e]!r} straddles the prompt/target boundary ({full[s:boundary]!r} | {full[boundary:e]!r}); "
                          "it is scored as a target token")
    return plan


def plan_lm_eval(tokenizer: Any, context: int, text: str, *, max_length: int | None = None, prefix_token: str | int | None = None) -> ScorePlan:
    """A text by lm-evaluation-harness's ``loglikelihood_rolling`` convention
    (module docstring); ``max_length`` defaults to the context."""
    if not isinstance(text, str) or not text.strip():
        raise LiveppError("the text to score is empty")
    prefix = prefix_token_id(tokenizer, prefix_token)
    tokens = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    length = max_length or context
    if length > context:
        raise LiveppError(f"max_length {length} exceeds the model's context of {context} tokens")
    rule = (f"lm-eval: every token scored, the first after the prefix token {tokenizer.convert_ids_to_tokens(prefix)!r} (id {prefix}); "
            f"disjoint windows of {length} predicted tokens, the last with a full window of context")
    return ScorePlan([prefix] + tokens, lm_eval_windows(len(tokens), length), 1, rule, max_length=length, stride=None)
