"""Teacher-forced scoring on the real model: windows, target PPL, parity with the decoder."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from livepp import Decoder, GenerationParams, LiveppError, LoadedModel
from livepp.cli.main import main
from livepp.scoring.teacher_forced import plan_windows, score_ids, score_target, score_text, text_ids

pytestmark = pytest.mark.model

TEXT = (
    "The GNU General Public License is a free, copyleft license for software and other kinds of works. "
    "The licenses for most software and other practical works are designed to take away your freedom."
)


def logprob_of_last(loaded, context_ids):
    """Oracle: log p(last id | all before it), from one forward pass of exactly that context."""
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([context_ids[:-1]])).logits[0, -1].float()
    return torch.log_softmax(logits, -1)[context_ids[-1]].item()


def test_plan_windows_match_the_guide():
    # stride == max_length: chunks, each chunk's first token unscored
    assert [(w.begin, w.end, w.score_from) for w in plan_windows(10, 4, 4)] == [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    # overlapping: each token scored once
    ws = plan_windows(10, 4, 2)
    assert [(w.begin, w.end, w.score_from) for w in ws] == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    for n, L, s in [(37, 8, 3), (50, 10, 10), (9, 16, 4), (100, 7, 1)]:
        scored = [p for w in plan_windows(n, L, s) for p in range(w.score_from, w.end)]
        expected_unscored = {0} | ({w.begin for w in plan_windows(n, L, s)} if s == L else set())
        assert sorted(scored) == [p for p in range(n) if p not in expected_unscored]


def test_stride_equal_max_length_is_independent_chunks(loaded):
    ids, first, _ = text_ids(loaded, TEXT)
    L = 16
    result = score_ids(loaded, ids, score_from=first, max_length=L, stride=L)
    total, count = 0.0, 0
    for begin in range(0, len(ids), L):
        chunk = ids[begin : begin + L]
        if len(chunk) < 2:
            continue
        with torch.inference_mode():
            logits = loaded.model(input_ids=torch.tensor([chunk])).logits[0].float()
        lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(chunk[1:])[:, None])
        total += -lp.sum().item()
        count += len(chunk) - 1
    assert result.n_tokens == count
    assert result.mean_nll == pytest.approx(total / count, abs=1e-5)


def test_stride_one_equals_brute_force_oracle(loaded):
    ids, first, _ = text_ids(loaded, "Once upon a time there was a small cat who liked to sail boats on the lake.")
    L = 6
    result = score_ids(loaded, ids, score_from=first, max_length=L, stride=1)
    assert [t.token_id for t in result.tokens] == ids[1:]
    for pos, tok in zip(range(1, len(ids)), result.tokens):
        context = ids[max(0, pos - L + 1) : pos + 1]
        assert tok.logprob == pytest.approx(logprob_of_last(loaded, context), abs=1e-4)


def test_batched_windows_equal_batch_one(loaded):
    ids, first, _ = text_ids(loaded, TEXT)
    one = score_ids(loaded, ids, score_from=first, max_length=12, stride=5, batch_size=1)
    many = score_ids(loaded, ids, score_from=first, max_length=12, stride=5, batch_size=4)
    assert [t.token_id for t in one.tokens] == [t.token_id for t in many.tokens]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(one.tokens, many.tokens)) < 1e-4
    assert max(abs(a.entropy - b.entropy) for a, b in zip(one.tokens, many.tokens)) < 1e-3


def test_scores_equal_streamed_decoder_logprobs(loaded):
    decoder = Decoder(loaded)
    prompt_ids = decoder.encode("Describe a sunset in two sentences.")
    records = list(decoder.stream(prompt_ids, GenerationParams(max_new_tokens=20, temperature=0.8, seed=5)))
    gen = [r.token_id for r in records]
    scored = score_ids(loaded, prompt_ids + gen, score_from=len(prompt_ids))
    assert [t.token_id for t in scored.tokens] == gen
    assert max(abs(t.logprob - r.logprob) for t, r in zip(scored.tokens, records)) <= 1e-4
    assert max(abs(t.entropy - r.entropy) for t, r in zip(scored.tokens, records)) <= 1e-3


def test_target_ppl_is_the_mean_over_exactly_the_target_tokens(loaded):
    prompt, target = "The capital of France is", " Paris, a city on the Seine."
    result = score_target(loaded, prompt, target)
    tok = loaded.tokenizer
    # The tokenizer's own rule: SmolLM2's tok(text) adds no BOS, so the oracle
    # scores exactly the target tokens after exactly the prompt's tokens.
    assert tok.bos_token == "<|im_start|>" and tok(prompt)["input_ids"] == tok(prompt, add_special_tokens=False)["input_ids"]
    enc = tok(prompt + target, return_offsets_mapping=True)
    target_positions = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s >= len(prompt)]
    ids = enc["input_ids"]
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([ids])).logits[0].float()
    lps = torch.log_softmax(logits, -1)
    expected = [lps[p - 1, ids[p]].item() for p in target_positions]
    assert [t.token_id for t in result.tokens] == [ids[p] for p in target_positions]
    assert result.mean_nll == pytest.approx(-sum(expected) / len(expected), abs=1e-5)
    assert "no BOS added" in result.first_token_rule
    assert result.straddling_token is None
    assert "".join(t.text for t in result.tokens) == target


def test_boundary_straddling_is_reported(loaded):
    result = score_target(loaded, "I love New Yo", "rk City.")
    straddle = result.straddling_token
    assert straddle is not None
    assert straddle["prompt_part"] and straddle["target_part"]
    assert straddle["prompt_part"] + straddle["target_part"] == straddle["text"]
    assert any("straddles" in n for n in result.notes)


def test_chat_target(loaded):
    result = score_target(loaded, "What is 2+3?", "2 + 3 = 5", chat=True)
    assert "".join(t.text for t in result.tokens) == "2 + 3 = 5"
    wrong = score_target(loaded, "What is 2+3?", "2 + 3 = 9", chat=True)
    assert wrong.ppl > result.ppl


def test_longer_than_context_forces_windows(loaded):
    class Small(LoadedModel):
        context_length = 16

    small = Small(loaded.model, loaded.tokenizer, loaded.name, loaded.source)
    result = score_text(small, TEXT)
    assert result.forced_windows and result.max_length == 16 and result.stride == 8
    assert result.n_tokens == len(text_ids(loaded, TEXT)[0]) - 1
    with pytest.raises(LiveppError, match="exceeds the model's context"):
        score_text(small, TEXT, max_length=32)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda m: score_text(m, ""), "the text to score is empty"),
        (lambda m: score_target(m, "Hello", "   \n"), "the target is empty or only whitespace"),
        (lambda m: score_target(m, "", "x"), "the prompt is empty"),
        (lambda m: score_text(m, TEXT, max_length=8, stride=9), "stride must be between"),
    ],
)
def test_bad_scoring_input(loaded, call, message):
    with pytest.raises(LiveppError, match=message):
        call(loaded)


def run(*args, input=None):
    return CliRunner().invoke(main, ["score", *args], input=input)


def test_cli_score_file_json_and_text(loaded, tmp_path):
    f = tmp_path / "doc.txt"
    f.write_text(TEXT, encoding="utf-8")
    r = run(str(f), "--json", "--max-length", "16", "--stride", "8")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["type"] == "score" and out["windows"] > 1 and out["stride"] == 8
    assert out["n_tokens"] == len(out["tokens"])
    assert set(out["tokens"][0]) == {"token_id", "text", "logprob", "entropy"}
    assert out["ppl"] == pytest.approx(math.exp(-sum(t["logprob"] for t in out["tokens"]) / out["n_tokens"]))
    r = run(str(f))
    assert r.exit_code == 0 and "PPL" in r.stdout and "first token:" in r.stdout


def test_cli_jsonl_reports_corpus_and_macro(loaded, tmp_path):
    f = tmp_path / "recs.jsonl"
    f.write_text(
        json.dumps({"text": "The sun rises in the east."}) + "\n"
        + json.dumps({"prompt": "2 + 2 =", "target": " 4"}) + "\n"
        + json.dumps({"text": "Colourless green ideas sleep furiously in the attic of time."}) + "\n",
        encoding="utf-8",
    )
    r = run(str(f), "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    recs, corpus = rows[:-1], rows[-1]
    assert [x["type"] for x in recs] == ["record"] * 3 and corpus["type"] == "corpus"
    n = sum(x["n_tokens"] for x in recs)
    corpus_nll = sum(x["mean_nll"] * x["n_tokens"] for x in recs) / n
    assert corpus["corpus_ppl"] == pytest.approx(math.exp(corpus_nll))
    assert corpus["macro_mean_ppl"] == pytest.approx(sum(x["ppl"] for x in recs) / 3)
    r = run(str(f))
    assert "corpus PPL (token-weighted" in r.stdout and "macro mean of per-record PPLs" in r.stdout


def test_cli_errors(loaded, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait".encode("latin-1"))
    r = run(str(bad))
    assert r.exit_code == 2 and "not valid UTF-8" in r.stderr
    r = run("--prompt", "Hello", "--target", "  ")
    assert r.exit_code == 2 and "only whitespace" in r.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in run(str(empty)).stderr
    broken = tmp_path / "x.jsonl"
    broken.write_text('{"text": "ok"}\n{nope\n')
    r = run(str(broken), "--json")
    assert r.exit_code == 2 and "x.jsonl:2: not valid JSON" in r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["type"] == "error"
    assert "--stride needs --max-length" in run("-", "--stride", "3", input="hi there").stderr


def test_greedy_token_scores_equal_two_pass_recipe(loaded):
    from livepp import greedy_token_scores

    decoder = Decoder(loaded)
    result = greedy_token_scores("What is the capital of Italy?", model=decoder, max_new_tokens=12)
    prompt_ids = decoder.encode("What is the capital of Italy?")
    answer = [t.token_id for t in result.tokens]
    # The LMDeploy two-pass recipe: score prompt + greedy answer teacher-forced.
    two_pass = score_ids(loaded, prompt_ids + answer, score_from=len(prompt_ids))
    assert [t.token_id for t in two_pass.tokens] == answer
    assert max(abs(a.logprob - b.logprob) for a, b in zip(result.tokens, two_pass.tokens)) <= 1e-4
    assert result.ppl == pytest.approx(two_pass.ppl, rel=1e-4)


def test_windowed_target_scores_only_target_tokens_and_skips_prompt_windows(loaded):
    prompt = "The GNU General Public License is a free, copyleft license for software and other kinds of works."
    target = " The licenses for most software are designed to take away your freedom."
    whole = score_target(loaded, prompt, target)
    windowed = score_target(loaded, prompt, target, max_length=12, stride=4)
    assert [t.token_id for t in windowed.tokens] == [t.token_id for t in whole.tokens]
    ids = loaded.tokenizer(prompt + target)["input_ids"]
    n_ids = len(ids)
    assert windowed.windows < len(plan_windows(n_ids, 12, 4))
    # Each target token gets the left context of the guide's window that scores it.
    plan = plan_windows(n_ids, 12, 4)
    for tok, pos in zip(windowed.tokens, range(n_ids - len(whole.tokens), n_ids)):
        w = next(w for w in plan if w.score_from <= pos < w.end)
        assert tok.logprob == pytest.approx(logprob_of_last(loaded, ids[w.begin : pos + 1]), abs=1e-4)


def test_position_scores_without_entropy_or_rank_skip_them_and_change_nothing_else():
    """The OpenAI scoring path asks for neither (its shapes carry no entropy,
    only vLLM's prompt_logprobs a rank): the logprobs and top-k stay exactly
    those of the full computation, and the skipped fields say so (None, 0)."""
    import math

    import torch

    from livepp.engines.torch.sampling import position_scores

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50_000, generator=g) * 3
    ids = torch.randint(0, 50_000, (6,), generator=g).tolist()
    full = position_scores(logits, list(range(1, 7)), ids, 3)
    lean = position_scores(logits, list(range(1, 7)), ids, 3, entropy=False, rank=False)
    assert [(s.position, s.token_id, s.logprob, s.top) for s in lean] == [(s.position, s.token_id, s.logprob, s.top) for s in full]
    assert all(s.entropy is None and s.rank == 0 for s in lean)
    p = torch.softmax(logits.double(), -1)
    want_entropy = (-(p * p.log()).sum(-1)).tolist()
    want_rank = [int((logits[i] > logits[i, t]).sum()) + 1 for i, t in enumerate(ids)]
    assert [s.rank for s in full] == want_rank
    assert all(math.isclose(s.entropy, h, rel_tol=1e-5) for s, h in zip(full, want_entropy))
