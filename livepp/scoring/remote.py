"""Scoring given text on any OpenAI-compatible server that serves prompt
logprobs (vLLM, SGLang, livepp serve): the contract lm-evaluation-harness
uses, ``/v1/completions`` with ``echo: true, logprobs: 0, max_tokens: 1``.

The server tokenizes (its own rule decides a BOS; the first token is never
scored, nothing predicts it) and returns every prompt token's logprob; the
prompt's entries are the first ``usage.prompt_tokens`` (the one generated
token is dropped). A target given a prompt is found by character offsets, as
``livepp score`` finds it: the first token that carries target characters.
Sliding windows need the server's ``/tokenize``: each window is sent as token
ids. A server that ignores ``echo`` or refuses it is an error that says so.
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from typing import Any

from livepp.core.params import LiveppError
from livepp.scoring.plans import ScoredToken, ScoreResult, plan_windows

__all__ = ["RemoteScorer", "parse_echo"]


def parse_echo(response: dict[str, Any], *, text: str | None = None) -> list[tuple[str, float | None, int]]:
    """(token text, logprob or None, character offset into ``text``) of every
    prompt token of one echo response (its first choice)."""
    try:
        choice = response["choices"][0]
        logprobs = choice["logprobs"]
        tokens, values = logprobs["tokens"], logprobs["token_logprobs"]
        offsets = logprobs.get("text_offset") or []
        n_prompt = int(response.get("usage", {}).get("prompt_tokens") or 0) or len(tokens)
    except (KeyError, IndexError, TypeError, ValueError):
        raise LiveppError("the server's answer has no prompt logprobs (choices[0].logprobs.tokens / token_logprobs)") from None
    tokens, values = tokens[:n_prompt], values[:n_prompt]
    if len(values) < n_prompt or (n_prompt > 1 and all(v is None for v in values)):
        raise LiveppError("the server did not echo the prompt's logprobs (echo: true, logprobs: 0): it does not serve prompt scoring")
    # Offsets count the tokens' own strings (a BOS's too); the text starts after the leading ones it does not hold.
    joined = "".join(tokens)
    lead = len(joined) - len(text) if text is not None and joined.endswith(text) else 0
    starts = [o - lead for o in offsets[:n_prompt]] if len(offsets) >= n_prompt else \
        [sum(len(t) for t in tokens[:i]) - lead for i in range(n_prompt)]
    return [(t, v, s) for t, v, s in zip(tokens, values, starts)]


class RemoteScorer:
    """``url`` is the server's OpenAI base (``http://host:port/v1``)."""

    def __init__(self, url: str, model: str, *, api_key: str | None = None, timeout: float = 300.0) -> None:
        self.base = url.rstrip("/")
        self.root = self.base[: -len("/v1")] if self.base.endswith("/v1") else self.base
        self.model, self.api_key, self.timeout = model, api_key, timeout

    def _post(self, url: str, body: dict[str, Any], what: str) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise LiveppError(f"the server refused {what} (HTTP {exc.code}): {str(detail).strip()[:300]}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise LiveppError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
        except ValueError:
            raise LiveppError(f"{url} answered something that is not JSON") from None

    def _echo(self, prompt: str | list[int]) -> dict[str, Any]:
        return self._post(f"{self.base}/completions", {"model": self.model, "prompt": prompt, "echo": True, "logprobs": 0, "max_tokens": 1,
                                                       "temperature": 0}, "echo with logprobs")

    def tokenize(self, text: str) -> list[int]:
        out = self._post(f"{self.root}/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": True}, "/tokenize")
        if not isinstance(out.get("tokens"), list):
            raise LiveppError("the server's /tokenize answered no token list")
        return [int(t) for t in out["tokens"]]

    def score_text(self, text: str, *, max_length: int | None = None, stride: int | None = None) -> ScoreResult:
        if not text.strip():
            raise LiveppError("the text to score is empty")
        rule = "remote: the server's tokenizer and its own special tokens; the first token has no context and is not scored"
        if max_length is None:
            entries = parse_echo(self._echo(text), text=text)
            ids = self._ids(text, len(entries))
            tokens = [ScoredToken(i, t, v, math.nan) for i, (t, v, _) in zip(ids, entries) if v is not None]
            return ScoreResult(tokens=tokens[:], first_token_rule=rule)
        ids = self.tokenize(text)
        windows = plan_windows(len(ids), max_length, stride or max_length)
        tokens = []
        for w in windows:
            entries = parse_echo(self._echo(ids[w.begin : w.end]))
            for pos in range(w.score_from, w.end):
                token, value, _ = entries[pos - w.begin]
                if value is None:
                    raise LiveppError(f"the server gave no logprob for position {pos - w.begin} of a window")
                tokens.append(ScoredToken(ids[pos], token, value, math.nan))
        return ScoreResult(tokens=tokens, first_token_rule=rule, windows=len(windows), max_length=max_length, stride=stride or max_length)

    def score_target(self, prompt: str, target: str) -> ScoreResult:
        """``target`` given ``prompt``: tokenized together by the server; the
        target's tokens found by character offsets (a token straddling the
        boundary counts as a target token and is reported)."""
        if not prompt.strip() or not target.strip():
            raise LiveppError("the prompt and the target must not be empty")
        full, boundary = prompt + target, len(prompt)
        entries = parse_echo(self._echo(full), text=full)
        ids = self._ids(full, len(entries))
        first = next((i for i, (t, _, start) in enumerate(entries) if t and start + len(t) > boundary), None)
        if first is None or first == 0:
            raise LiveppError("the target has no token after the prompt's")
        token, _, start = entries[first]
        result = ScoreResult(tokens=[ScoredToken(i, t, v if v is not None else math.nan, math.nan)
                                     for i, (t, v, _) in list(zip(ids, entries))[first:]],
                             first_token_rule="remote: prompt + target tokenized together by the server; only target tokens are scored")
        if start < boundary:
            result.straddling_token = {"index": first, "token_id": ids[first], "text": token, "prompt_part": full[start:boundary],
                                       "target_part": full[boundary : start + len(token)]}
            result.notes.append(f"token {token!r} straddles the prompt/target boundary; it is scored as a target token")
        return result

    def _ids(self, text: str, n: int) -> list[int]:
        """The prompt's token ids when the server has /tokenize (else -1 each)."""
        try:
            ids = self.tokenize(text)
        except LiveppError:
            return [-1] * n
        return ids if len(ids) == n else [-1] * n
