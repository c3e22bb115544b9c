"""``--exact`` on every command that runs the llama.cpp engine: generation
whose logprobs equal llama.cpp's token-by-token evaluation, prompt included."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from livepp.cli.main import main
from test_llamacpp_engine import teacher_forced

pytestmark = pytest.mark.model

LONG_PROMPT = "Summarise this: " + " ".join(open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read().split()[:120])


def _generate(*extra: str) -> list[dict]:
    out = CliRunner().invoke(main, ["generate", LONG_PROMPT, "--engine", "llama.cpp", "--max-new-tokens", "12", "--ignore-eos",
                                    "--json", *extra])
    assert out.exit_code == 0, out.output
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_generate_exact_equals_llamacpps_token_by_token_evaluation():
    """The prompt is prefilled one token per decode, so every generated
    token's logprob equals llama.cpp's token-by-token teacher forcing; the
    default path (prompt in batched kernels) is printed against it, since
    its distance depends on the processor."""
    from livepp.engines.torch.models import gguf_and_tokenizer

    gguf = str(gguf_and_tokenizer(None)[0])  # the embedded model's file
    for flags, bound in ((["--exact"], 1e-4), ([], None)):
        events = _generate(*flags)
        start = events[0]
        tokens = [e for e in events if e["type"] == "token"]
        ids = list(start["prompt_token_ids"]) + [t["token_id"] for t in tokens]
        want = np.array(teacher_forced(gguf, ids, len(start["prompt_token_ids"]), token_by_token=True))
        diff = np.abs(np.array([t["logprob"] for t in tokens]) - want)
        if bound is not None:
            assert diff.max() <= bound
        else:
            print(f"default path, {len(start['prompt_token_ids'])} prompt tokens: max {diff.max():.2e}, median {np.median(diff):.1e} nats "
                  "from token-by-token")


@pytest.mark.parametrize("command", [
    ["generate", "hi"],
    ["think", "What is 2+2?"],
    ["route", "What is 2+2?"],
    ["calibrate", "builtin:sums", "--out", "/dev/null"],
    ["serve", "--port", "0"],
    ["score", "--prompt", "a", "--target", "b"],
])
def test_every_command_that_runs_llamacpp_takes_exact_and_refuses_it_on_torch(command):
    help_text = CliRunner().invoke(main, [command[0], "--help"]).output
    assert "--exact" in help_text
    out = CliRunner().invoke(main, [*command, "--engine", "torch", "--exact"])
    assert out.exit_code == 2 and "--exact is for --engine llama.cpp" in out.output
