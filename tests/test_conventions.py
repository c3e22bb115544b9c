"""Which tokens `score` counts, checked against lm-evaluation-harness itself
(the `lm-eval` package runs our model through its own HFLM code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from livepp import Decoder, GenerationParams
from livepp.cli.main import main
from livepp.scoring.teacher_forced import score_target, score_text, score_text_lm_eval

pytestmark = pytest.mark.model

GPL = Path("/usr/share/common-licenses/GPL-3")


@pytest.fixture(scope="module")
def harness(loaded):
    pytest.importorskip("lm_eval", reason="install the test extras: pip install -e '.[test]'")
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, backend="causal", max_length=512, batch_size=1)


def _request(kind, *args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_target_total_equals_lm_eval_loglikelihood(loaded, harness):
    prompt, target = "The capital of France is", " Paris, a city on the Seine."
    [(expected, _)] = harness.loglikelihood([_request("loglikelihood", prompt, target)], disable_tqdm=True)
    result = score_target(loaded, prompt, target)
    assert result.n_tokens == 9
    assert -result.sum_nll == pytest.approx(expected, abs=1e-4)  # -21.4795 on this model
    assert result.ppl == pytest.approx(10.88, abs=0.01)


def test_cli_lm_eval_convention_reproduces_the_rolling_total(loaded, harness, tmp_path):
    text = (GPL.read_text() if GPL.is_file() else "The quick brown fox jumps over the lazy dog. " * 200)[:6000]
    [expected] = harness.loglikelihood_rolling([_request("loglikelihood_rolling", text)], disable_tqdm=True)
    path = tmp_path / "doc.txt"
    path.write_text(text)
    out = CliRunner().invoke(main, ["score", str(path), "--max-length", "512", "--convention", "lm-eval", "--json"])
    assert out.exit_code == 0, out.output
    row = json.loads(out.output.strip().splitlines()[-1])
    n = len(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert n > 1024 and row["n_tokens"] == n  # every token scored, over three windows or more
    assert -row["mean_nll"] * row["n_tokens"] == pytest.approx(expected, rel=1e-6)
    assert row["first_token_rule"].startswith("lm-eval: every token scored")
    # The guide's recipe with a BOS and windows of 513 is a different number:
    # it differs in the last window's context.
    guide = score_text(loaded, text, max_length=513, stride=512)
    assert abs(guide.sum_nll + expected) / abs(expected) > 1e-3


def test_prefix_token_can_be_chosen(loaded):
    text = "Hello there, general Kenobi."
    bos = score_text_lm_eval(loaded, text, prefix_token="bos")
    eos = score_text_lm_eval(loaded, text, prefix_token="eos")
    by_id = score_text_lm_eval(loaded, text, prefix_token=loaded.tokenizer.eos_token_id)
    assert bos.n_tokens == eos.n_tokens == len(loaded.tokenizer(text)["input_ids"])
    assert eos.tokens[0].logprob == by_id.tokens[0].logprob != bos.tokens[0].logprob
    out = CliRunner().invoke(main, ["score", "-", "--convention", "lm-eval", "--prefix-token", "x"], input=text)
    assert out.exit_code == 2 and "bos, eos or a token id" in out.output


def test_default_rule_is_the_tokenizers_own_and_is_printed(loaded):
    text = "Hello there, general Kenobi."
    result = score_text(loaded, text)
    assert result.n_tokens == len(loaded.tokenizer(text)["input_ids"]) - 1  # SmolLM2 adds no BOS
    out = CliRunner().invoke(main, ["score", "-"], input=text)
    assert "first token: hf: tokenizer(text) adds no BOS" in out.output


def test_score_equals_generate_raw_logprobs(loaded):
    decoder = Decoder(loaded)
    prompt = "The capital of France is"
    ids = decoder.encode(prompt, raw=True)
    records = list(decoder.stream(ids, GenerationParams(max_new_tokens=8, raw=True, ignore_eos=True)))
    generated = "".join(r.text for r in records)
    result = score_target(loaded, prompt, generated)
    assert [t.token_id for t in result.tokens] == [r.token_id for r in records]
    assert max(abs(t.logprob - r.logprob) for t, r in zip(result.tokens, records)) <= 1e-4
