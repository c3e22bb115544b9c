"""Teacher-forced scoring of given text: PPL of a text, of a target given a
prompt, and of long documents with sliding windows.

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
from typing import Any, Callable, Sequence

import torch

from livepp.engines.torch.models import LoadedModel
from livepp.core.params import LiveppError

__all__ = [
    "lm_eval_windows",
    "ScoredToken",
    "ScoreResult",
    "Window",
    "plan_windows",
    "score_ids",
    "score_text",
    "score_target",
    "text_ids",
]


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


def text_ids(loaded: LoadedModel, text: str) -> tuple[list[int], int, str]:
    """Ids to score a text by the default (hf) rule: (ids, first scored position, rule)."""
    if not isinstance(text, str) or not text.strip():
        raise LiveppError("the text to score is empty")
    ids, lead = _added_specials(loaded.tokenizer, text)
    return ids, max(len(lead), 1), _hf_rule(loaded.tokenizer, lead)


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


@torch.inference_mode()
def _score_windows(
    loaded: LoadedModel,
    ids: list[int],
    windows: Sequence[Window],
    *,
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> dict[int, tuple[float, float]]:
    """{position: (logprob, entropy)} for every scored position of every window."""
    model = getattr(loaded, "model", None)
    out: dict[int, tuple[float, float]] = {}
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        # A window's last token is predicted, never fed: nothing reads its logits.
        length = max(w.end - 1 - w.begin for w in batch)
        # Window-relative position p's logits predict token p+1, so a window
        # needs logits from score_from-1 to end-2. Keeping the last `keep`
        # positions of the padded batch covers every row's need.
        first_needed = min(w.score_from - 1 - w.begin for w in batch)
        keep = length - first_needed
        # Right padding needs no attention mask: under causal attention real
        # positions never see the pad tokens that come after them.
        rows = [ids[w.begin : w.end - 1] + [0] * (length - (w.end - 1 - w.begin)) for w in batch]
        if isinstance(loaded, LoadedModel):
            logits = model(input_ids=torch.tensor(rows, device=model.device), use_cache=False, logits_to_keep=keep).logits
        else:  # another engine's teacher-forced logits (llama.cpp): [rows, keep, V]
            logits = loaded.window_logits(rows, keep)
        for row, w in enumerate(batch):
            lo = (w.score_from - 1 - w.begin) - first_needed
            hi = (w.end - 1 - w.begin) - first_needed
            logprobs = torch.log_softmax(logits[row, lo:hi].float(), dim=-1)
            target = torch.tensor(ids[w.score_from : w.end], device=logprobs.device)
            chosen = logprobs.gather(1, target[:, None])[:, 0]
            p = logprobs.exp()
            entropy = -torch.where(p > 0, p * logprobs, 0.0).sum(-1)
            for pos, lp, ent in zip(range(w.score_from, w.end), chosen.tolist(), entropy.tolist()):
                out[pos] = (lp, ent)
        if progress is not None:
            progress(len(batch))
    return out


def score_ids(
    loaded: LoadedModel,
    ids: list[int],
    *,
    score_from: int = 1,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 1,
    first_token_rule: str = "",
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
) -> ScoreResult:
    """Score positions ``score_from..len(ids)-1`` of ``ids`` teacher-forced.

    Without ``max_length`` the whole sequence is one window, unless it is
    longer than the model's context: then windows of the context length with
    half-context stride are forced, and the result says so.
    """
    if batch_size < 1:
        raise LiveppError(f"batch_size must be >= 1, got {batch_size}")
    if len(ids) < 2 or not 1 <= score_from < len(ids):
        raise LiveppError("nothing to score: the text has no token that can be scored")
    context = loaded.context_length
    forced = False
    notes = []
    if max_length is None:
        if len(ids) <= context:
            max_length = len(ids)
            stride = max_length
        else:
            forced = True
            max_length, stride = context, context // 2
            notes.append(
                f"{len(ids)} tokens exceed the model's context of {context}: "
                f"scored with sliding windows of {max_length}, stride {stride}"
            )
    elif max_length > context:
        raise LiveppError(f"max_length {max_length} exceeds the model's context of {context} tokens")
    if stride is None:
        stride = max_length
    # Positions before score_from (a target's prompt) are context only: no
    # window scores them, and windows that would score nothing else are skipped.
    windows = [
        Window(w.begin, w.end, max(w.score_from, score_from))
        for w in plan_windows(len(ids), max_length, stride)
        if w.end > max(w.score_from, score_from)
    ]
    if on_plan is not None:
        on_plan(len(windows))
    scored = _score_windows(loaded, ids, windows, batch_size=batch_size, progress=progress)
    decode = loaded.tokenizer.decode
    tokens = [
        ScoredToken(ids[pos], decode([ids[pos]]), *scored[pos])
        for pos in range(score_from, len(ids))
        if pos in scored
    ]
    whole = len(windows) == 1 and windows[0].begin == 0 and windows[0].end == len(ids)
    return ScoreResult(
        tokens=tokens,
        first_token_rule=first_token_rule,
        windows=len(windows),
        max_length=None if whole and not forced else max_length,
        stride=None if whole and not forced else stride,
        forced_windows=forced,
        notes=notes,
    )


def score_text(loaded: LoadedModel, text: str, **options: Any) -> ScoreResult:
    """PPL of a text (see the module docstring for the first-token rule)."""
    ids, first, rule = text_ids(loaded, text)
    return score_ids(loaded, ids, score_from=first, first_token_rule=rule, **options)


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


def score_target(loaded: LoadedModel, prompt: str, target: str, *, chat: bool = False, **options: Any) -> ScoreResult:
    """PPL of ``target`` given ``prompt``, the LightLLM recipe.

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
    tok = loaded.tokenizer
    prefix_text, specials = target_prefix(tok, prompt, chat=chat)
    if chat:
        rule = "the chat template supplies the context; only target tokens are scored"
    else:
        _, lead = _added_specials(tok, prompt)
        rule = (f"hf: prompt + target tokenized together by the tokenizer's own rule ({'adds ' + _token_names(tok, lead) if lead else 'no BOS added'}); "
                "only target tokens are scored, each conditioned on everything before it")
    full = prefix_text + target
    boundary = len(prefix_text)
    enc = tok(full, add_special_tokens=specials, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    special_ids = set(getattr(tok, "all_special_ids", ()))
    first = next((i for i, span in enumerate(offsets) if carries_target(ids[i], span, boundary, special_ids)), None)
    if first is None:
        raise LiveppError("the target produced no tokens")
    if first == 0:
        raise LiveppError("the target starts the sequence, so its first token has no context; give a prompt")
    straddle = None
    s, e = offsets[first]
    if s < boundary:
        straddle = {
            "index": first,
            "token_id": ids[first],
            "text": full[s:e],
            "prompt_part": full[s:boundary],
            "target_part": full[boundary:e],
        }
    result = score_ids(loaded, ids, score_from=first, first_token_rule=rule, **options)
    result.straddling_token = straddle
    if straddle is not None:
        result.notes.append(
            f"token {straddle['text']!r} straddles the prompt/target boundary "
            f"({straddle['prompt_part']!r} | {straddle['target_part']!r}); it is scored as a target token"
        )
    return result


def score_text_lm_eval(loaded: LoadedModel, text: str, *, max_length: int | None = None, prefix_token: str | int | None = None,
                       batch_size: int = 1, progress: Callable[[int], None] | None = None,
                       on_plan: Callable[[int], None] | None = None) -> ScoreResult:
    """PPL of a text by lm-evaluation-harness's ``loglikelihood_rolling``
    convention (module docstring); ``max_length`` defaults to the context."""
    if not isinstance(text, str) or not text.strip():
        raise LiveppError("the text to score is empty")
    tok = loaded.tokenizer
    prefix = prefix_token_id(tok, prefix_token)
    tokens = [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]
    context = loaded.context_length
    length = max_length or context
    if length > context:
        raise LiveppError(f"max_length {length} exceeds the model's context of {context} tokens")
    ids = [prefix] + tokens
    windows = lm_eval_windows(len(tokens), length)
    if on_plan is not None:
        on_plan(len(windows))
    scored = _score_windows(loaded, ids, windows, batch_size=batch_size, progress=progress)
    decode = tok.decode
    rule = (f"lm-eval: every token scored, the first after the prefix token {tok.convert_ids_to_tokens(prefix)!r} (id {prefix}); "
            f"disjoint windows of {length} predicted tokens, the last with a full window of context")
    return ScoreResult(
        tokens=[ScoredToken(ids[p], decode([ids[p]]), *scored[p]) for p in range(1, len(ids))],
        first_token_rule=rule,
        windows=len(windows),
        max_length=length,
        stride=None,
    )
