"""Linear layers packed for oneDNN (the CPU default): the model's numbers to
float32 rounding, the packed weights really used, and every way back to a
plain model (grad mode, unpacking, a compiled decoder, a copy)."""

from __future__ import annotations

import copy

import pytest
import torch

from livepp import load_model
from livepp.engines.torch.packed import PackedLinear, can_pack, pack_linears, unpack_linears
from livepp.engines.torch.rowcache import final_logits

pytestmark = pytest.mark.skipif(not can_pack(), reason="this torch has no oneDNN packed linear")


@pytest.fixture(scope="module")
def plain():
    return load_model(pack=False)


def _linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def test_the_cpu_default_packs_every_linear_layer(loaded):
    layers = _linears(loaded.model)
    assert layers and all(type(m) is PackedLinear for m in layers)
    head = loaded.model.get_output_embeddings()
    assert head.weight is loaded.model.get_input_embeddings().weight  # still tied: the dense weight is the parameter it was


@pytest.mark.parametrize("n", [1, 30, 300])
def test_packed_logprobs_equal_the_plain_model_to_float32_rounding(loaded, plain, n):
    ids = torch.randint(100, 40000, (1, n), generator=torch.Generator().manual_seed(n))
    with torch.inference_mode():
        a = torch.log_softmax(plain.model(ids).logits.double(), -1)
        b = torch.log_softmax(loaded.model(ids).logits.double(), -1)
    diff = (a - b).abs()
    # Whether the two kernels round alike depends on the processor: printed, not asserted
    # (that the packed weight is what computes is asserted below, with a packed copy of zeros).
    print(f"{n} positions: largest logprob difference from the plain model {diff.max().item():.1e}")
    assert diff.max().item() < 5e-4
    assert (diff / a.abs().clamp(min=1.0)).max().item() < 1e-4


def test_the_packed_weight_is_what_computes_and_grad_mode_takes_the_dense_one(plain):
    model = copy.deepcopy(plain.model)
    assert pack_linears(model) == len(_linears(model))
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    dense = torch.nn.functional.linear(x, layer.weight)
    # A packed copy of zeros, recorded as made from the dense weight: what inference computes with.
    layer.packed = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(layer.weight), None)
    with torch.inference_mode():
        assert torch.equal(layer(x), torch.zeros_like(dense))
    assert torch.equal(layer(x), dense)  # autograd on: F.linear on the dense weight
    assert unpack_linears(model) == len(_linears(model)) and not any(type(m) is PackedLinear for m in model.modules())
    with torch.inference_mode():
        assert torch.equal(layer(x), dense)  # plain again


def _close_to_dense(layer, x):
    with torch.inference_mode():
        got = layer(x)
    want = torch.nn.functional.linear(x, layer.weight.detach(), None if layer.bias is None else layer.bias.detach())
    return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_packed_copy_follows_every_change_of_the_dense_weight(plain):
    model = copy.deepcopy(plain.model)
    pack_linears(model)
    layer = model.model.layers[1].self_attn.o_proj
    x = torch.randn(5, layer.in_features)
    assert _close_to_dense(layer, x)
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # in place
    assert _close_to_dense(layer, x)
    model.load_state_dict({k: v * 0.5 for k, v in plain.model.state_dict().items()})  # copied in place into every parameter
    assert _close_to_dense(layer, x) and _close_to_dense(model.model.layers[7].mlp.gate_proj, torch.randn(2, 576))
    layer.weight = torch.nn.Parameter(torch.randn(layer.out_features, layer.in_features))  # a new parameter
    assert _close_to_dense(layer, x)
    model.half().float()  # new storage, rounded
    assert _close_to_dense(layer, x)
    before = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(before + 64)  # a new, larger head
    head = model.get_output_embeddings()
    h = torch.randn(2, head.in_features)
    assert head.weight.shape[0] == before + 64 and _close_to_dense(head, h)
    with torch.inference_mode():
        assert final_logits(model, h).shape == (2, before + 64)


def test_a_copy_or_a_pickle_carries_the_dense_weight_and_packs_at_its_first_call(loaded):
    import pickle

    layer = loaded.model.model.layers[0].self_attn.q_proj
    x = torch.randn(4, layer.in_features)
    with torch.inference_mode():
        want = layer(x)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert type(twin) is PackedLinear and twin.packed is None and twin.weight is not layer.weight
        with torch.inference_mode():
            assert torch.equal(twin(x), want)
        assert twin.packed is not None and twin.packed is not layer.packed
    doubled = copy.deepcopy(layer).double()  # not float32: F.linear, nothing packed
    with torch.inference_mode():
        assert torch.allclose(doubled(x.double()), want.double(), atol=1e-4) and doubled.packed is None


def test_torch_compile_from_outside_traces_the_dense_weight(loaded):
    layer = copy.deepcopy(loaded.model.model.layers[0].mlp.up_proj)
    x = torch.randn(3, layer.in_features)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(compiled(x), torch.nn.functional.linear(x, layer.weight), rtol=1e-4, atol=1e-4)


def test_a_packed_head_gives_final_logits_for_any_rows_as_the_model(loaded):
    hidden = torch.randn(70, loaded.model.config.hidden_size)
    with torch.inference_mode():
        for n in (1, 2, 5, 64, 70):
            assert torch.equal(final_logits(loaded.model, hidden[:n]), loaded.model.lm_head(hidden[:n]))


def test_pack_false_and_other_devices_leave_the_model_plain(plain):
    assert not any(type(m) is PackedLinear for m in plain.model.modules())
    half = torch.nn.Linear(4, 4).to(torch.bfloat16)
    assert pack_linears(half) == 0 and type(half) is torch.nn.Linear


def test_compiling_a_decoder_turns_its_model_back_to_plain_linear(plain):
    from livepp import Decoder
    from livepp.engines.torch.models import LoadedModel

    model = copy.deepcopy(plain.model)
    pack_linears(model)
    Decoder(LoadedModel(model, plain.tokenizer, plain.name, plain.source)).compile(backend="eager")
    assert not any(type(m) is PackedLinear for m in model.modules()) and len(_linears(model)) > 0


def test_livepp_pack_0_in_the_environment_keeps_the_model_plain(monkeypatch):
    monkeypatch.setenv("LIVEPP_PACK", "0")
    assert not any(type(m) is PackedLinear for m in load_model().model.modules())
    assert any(type(m) is PackedLinear for m in load_model(pack=True).model.modules())
