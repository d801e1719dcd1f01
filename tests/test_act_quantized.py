"""SmolLM2 quantized by llmcompressor's FP8_DYNAMIC and W8A8 presets (activations quantized per token at run time)
against transformers running compressed-tensors' decompressed weights with each Linear's input quantized by
compressed-tensors' own dynamic quantization (tests/quantized.py: `quantize_activations`).

Why the splits are checked layer by layer: activation quantization rounds, so a value a float32 rounding away from a
rounding boundary lands on either side of it depending on summation order. An all-reduce of partial sums orders the
sums of a row-parallel layer differently from one matmul, so at 2 or more ranks one value in a few hundred thousand
moves by one quantization step, and the change propagates through the later layers (measured here: the first
difference is one token's row in layer 1, then every layer differs by about as much as activation quantization
itself changes the output; greedy FP8_DYNAMIC tokens at 3:2:1 part from one rank's at the 5th token). No split can
give one device's bits; what each split must give is one device's arithmetic: with the same inputs, every sharded
layer computes what the reference's Linear computes. One rank is compared end to end: logits and 16 greedy tokens.
"""

import dataclasses
import json
import shutil

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
from safetensors.torch import load_file, save_file

from raytp.kernels import act_quant_matmul, dispatch
from raytp.model.config import ModelConfig, UnsupportedModelError
from raytp.model.formats import ActQuantWeight, FP8Weight, IntWeight, PackedWeight, fused, read_linear
from raytp.model.formats.act_quant import runs_weight_only
from raytp.model.layout import Slice
from raytp.model.pieces import plan_model, quant_replicated_bytes
from raytp.runtime.sampling import SamplingParams
from raytp.weights.checkpoint import SafetensorsReader
from raytp.weights.source import ModelSource
from raytp.weights.tokenizer import Tokenizer
from tests.quantized import quantize_activations, reference_model
from tests.sharded import GiB, LocalGroup
from tests.test_quantized import SLICES, _ct_dense

SCHEMES = ("fp8-dynamic", "w8a8")
# 3: uneven, every rank with heads; 5: uneven and two ranks without heads (2:1 adds no case; one rank is the
# end-to-end comparison)
SPLITS = {3: [3.0, 2.0, 1.0], 5: [5.0, 1.0, 3.0, 1.0, 2.0]}
PROMPT = "Gravity bends light; 42 photons, café, naïve."
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def references(quantized_smollm2):
    made = {}

    def get(scheme):
        if scheme not in made:
            d = quantized_smollm2[scheme]
            made[scheme] = quantize_activations(reference_model(d), d), reference_model(d)
        return made[scheme]

    return get  # scheme -> (the reference, the same weights with activations left unquantized)


def _tokens(model_dir, text=PROMPT):
    return torch.tensor([Tokenizer.from_dir(model_dir).encode(text)])


@pytest.mark.parametrize("kind,dtype", [("float", torch.float8_e4m3fn), ("int", torch.int8)])
def test_per_token_quantization_is_compressed_tensors(kind, dtype):
    """raytp's quantized values times their scales are compressed-tensors' fake-quantized activations, bit for bit:
    rows of every magnitude, an all-zero row, halves on int8's rounding boundaries, (batch, seq, hidden) input."""
    args = QuantizationArgs(num_bits=8, type=kind, strategy="token", symmetric=True, dynamic=True)
    x = torch.randn(3, 11, 300) * torch.logspace(-4, 4, 11)[:, None]
    x[1, 2] = 0
    x[2, 3] = torch.arange(300) % 256 - 127.5  # amax 127.5: int8's scale is 1, every value a half
    scale, zero_point = compute_dynamic_scales_and_zp(x, args, torch.nn.Linear(1, 1))
    q, s = act_quant_matmul.quantize_per_token(x, dtype)
    assert q.dtype == dtype and torch.equal(s, scale)
    assert torch.equal(q.float() * s, fake_quantize(x, scale, zero_point, args))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_logits_match_transformers_with_quantized_activations(quantized_smollm2, references, scheme):
    model_dir = quantized_smollm2[scheme]
    reference, unquantized = references(scheme)
    tokens = _tokens(model_dir)
    with torch.no_grad():
        expected, weight_only = reference(tokens).logits[:, -1], unquantized(tokens).logits[:, -1]
    got = LocalGroup(model_dir, [1.0]).logits(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-4)
    assert (got - weight_only).abs().max() > 0.3  # the activations really are quantized: without, far off


@pytest.mark.parametrize("scheme", SCHEMES)
# repacked at 5 ranks: uneven shares, ranks with and without heads; the CPU ranks' formats at 3
@pytest.mark.parametrize("ranks,repacked", [(5, True), (3, False)])
def test_weight_only_repacking_gives_the_unquantized_activations_logits(quantized_smollm2, references, monkeypatch,
                                                                         scheme, ranks, repacked):
    """A group with a GPU rank runs these checkpoints weight-only: a CUDA rank repacks its e4m3 or int8 slices for
    the weight-only packed GEMV and leaves the activations in the model dtype. Here on the CPU, the same load path
    (packing forced; the products by the kernel's torch version, the CUDA kernel itself is checked in
    tests/gpu/test_act_quant_kernels.py) gives the logits of transformers on the dequantized weights without
    activation quantization, at uneven splits and with ranks without heads (which keep their empty slices and, like
    the others, exchange no amax). Not repacked: what CPU ranks of such a group run, the weights as e4m3 or int8
    weight-only formats."""
    if repacked:
        monkeypatch.setattr(fused, "use_triton", lambda t: True)  # repack as a CUDA rank does
        monkeypatch.setattr(fused, "reserve", lambda packed: None)  # the CUDA kernel's workspace: none on a CPU
    model_dir = quantized_smollm2[scheme]
    reference, unquantized = references(scheme)
    tokens = _tokens(model_dir)
    with torch.no_grad():
        expected, quantized = unquantized(tokens).logits[:, -1], reference(tokens).logits[:, -1]
    group = LocalGroup(model_dir, SPLITS[ranks], act_quant_weight_only=True)
    kind = "fp8" if scheme == "fp8-dynamic" else "int8"
    for model in group.models:
        for layer in model.layers:
            for linear in (layer.attention.qkv, layer.attention.o_proj, layer.mlp.gate_up, layer.mlp.down):
                w = linear.weight
                held = (isinstance(w, PackedWeight) and w.packed.kind.name == kind if repacked
                        else isinstance(w, FP8Weight if kind == "fp8" else IntWeight))
                assert held or isinstance(w, ActQuantWeight) and not w.weight.numel()
            assert not layer.attention.o_proj.row_amax and not layer.mlp.down.row_amax
    got = group.logits(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-4)
    assert (got - quantized).abs().max() > 0.3  # the activations really are left unquantized
    if ranks == 5:
        assert sum(not len(m.layers[0].attention.o_proj.part.cols) for m in group.models) == 2


def test_the_group_runs_weight_only_where_it_has_a_gpu_rank_with_the_kernels():
    """All of a group's ranks decide alike: CPU ranks alone, or --no-triton, quantize activations as the checkpoint
    says (the compressed-tensors reference above); a GPU rank with the kernels makes every rank run weight-only."""
    assert not runs_weight_only(["cpu", "cpu"], triton=True)
    assert not runs_weight_only(["cuda", "cpu"], triton=False)
    assert runs_weight_only(["cpu", "cuda"], triton=True) == (dispatch.triton is not None)


def _captured(reference, tokens):
    """Every o_proj, down_proj, q_proj and gate_proj of the reference: its input before quantization and its output."""
    seen, hooks = {}, []
    for name, module in reference.named_modules():
        if name.endswith(("o_proj", "down_proj", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            hooks.append(module.register_forward_pre_hook(  # ahead of quantize_activations' hook
                lambda m, args, name=name: seen.setdefault(name, {}).update(x=args[0]), prepend=True))
            hooks.append(module.register_forward_hook(
                lambda m, args, out, name=name: seen[name].update(y=out)))
    with torch.no_grad():
        reference(tokens)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("ranks", sorted(SPLITS))
def test_every_sharded_layer_computes_the_references_product(quantized_smollm2, references, scheme, ranks):
    """At uneven splits (and ranks without heads), each layer's shards, given the reference's inputs, give its
    outputs: row-parallel layers (o_proj, down_proj) quantize their slices with the whole row's per-token scale and
    sum to the reference's product; column-parallel ones (q/k/v, gate/up) give its rows."""
    model_dir = quantized_smollm2[scheme]
    seen = _captured(references(scheme)[0], _tokens(model_dir))
    group = LocalGroup(model_dir, SPLITS[ranks])

    def check(r, model):
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            assert isinstance(layer.attention.o_proj.weight, ActQuantWeight) and isinstance(layer.mlp.gate_up.weight, ActQuantWeight)
            for row_parallel, name in ((layer.attention.o_proj, "self_attn.o_proj"), (layer.mlp.down, "mlp.down_proj")):
                x, y = seen[p + name]["x"], seen[p + name]["y"]
                cols = row_parallel.part.cols
                torch.testing.assert_close(row_parallel(x[..., cols.start:cols.stop].contiguous()), y,
                                           rtol=1e-4, atol=1e-4)
            for column_parallel, names in ((layer.attention.qkv, ("q_proj", "k_proj", "v_proj")),
                                           (layer.mlp.gate_up, ("gate_proj", "up_proj"))):
                module = "self_attn." if names[0] == "q_proj" else "mlp."
                want = torch.cat([seen[p + module + n]["y"][..., s.rows.start:s.rows.stop]
                                  for n, s in zip(names, column_parallel.parts)], dim=-1)
                torch.testing.assert_close(column_parallel(seen[p + module + names[0]]["x"]), want,
                                           rtol=1e-4, atol=1e-4)
        return True

    assert all(group.on_all_ranks(check))
    if ranks == 5:
        assert sum(not len(m.layers[0].attention.o_proj.part.cols) for m in group.models) == 2


@pytest.mark.parametrize("scheme", SCHEMES)
def test_greedy_16_tokens_match_transformers(quantized_smollm2, references, scheme):
    model_dir = quantized_smollm2[scheme]
    tokenizer = Tokenizer.from_dir(model_dir)
    prompt = tokenizer.encode("Once upon a time, there was a little")
    with torch.no_grad():
        expected = references(scheme)[0].generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                                  eos_token_id=sorted(tokenizer.eos_token_ids))[0, len(prompt):]
    out = LocalGroup(model_dir, [1.0]).generate([prompt], SamplingParams(max_tokens=16),
                                                stop_ids=sorted(tokenizer.eos_token_ids))
    assert len(expected) == 16 and out["r0"] == expected.tolist()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_dequantized_slices_equal_compressed_tensors_unpacking(quantized_smollm2, scheme):
    model_dir = quantized_smollm2[scheme]
    quant = ModelConfig.from_file(model_dir).quant
    assert quant.dynamic_activations and quant.describe().startswith(scheme)
    with SafetensorsReader(model_dir, torch.float32, CPU) as reader:
        for module, rows, cols in SLICES:
            dense = _ct_dense(model_dir, module)
            got = read_linear(reader, Slice(module + ".weight", tuple(dense.shape), rows, cols, quant))
            assert got.weight.dtype == (torch.float8_e4m3fn if scheme == "fp8-dynamic" else torch.int8)
            want = dense[rows.start:rows.stop]
            assert torch.equal(got.dequantize(), want[:, cols.start:cols.stop] if cols is not None else want)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_planned_bytes_are_the_bytes_each_rank_holds(quantized_smollm2, scheme):
    group = LocalGroup(quantized_smollm2[scheme], SPLITS[5])
    config, replicated = group.config, quant_replicated_bytes(group.config, "float32")
    for model, shard in zip(group.models, group.plan.ranks):
        held = sum(t.numel() * t.element_size() for layer in model.layers
                   for linear in (layer.attention.qkv, layer.attention.o_proj, layer.mlp.gate_up, layer.mlp.down) for t in linear.weight.tensors())
        held += model.embed.table.numel() * 4
        assert held == shard.weight_bytes + replicated, (shard.rank, held)
    dense = plan_model(dataclasses.replace(config, quant=None), [("a", 3 * GiB)], max_context=256, max_batch=4,
                        dtype="float32")
    assert group.plan.ranks[0].weight_bytes < dense.ranks[0].weight_bytes


@pytest.fixture
def w8a8_copy(quantized_smollm2, tmp_path):
    return shutil.copytree(quantized_smollm2["w8a8"], tmp_path / "model")


@pytest.mark.parametrize("change,message", [
    (dict(dynamic=False), r"input_activations with dynamic=False.*static"),
    (dict(strategy="tensor"), r"strategy='tensor'"),
    (dict(num_bits=4), r"num_bits=4"),
    (dict(type="float"), r"type='float'"),
])
def test_other_activation_quantization_is_refused_naming_it(w8a8_copy, change, message):
    config = w8a8_copy / "config.json"
    d = json.loads(config.read_text())
    d["quantization_config"]["config_groups"]["group_0"]["input_activations"] |= change
    config.write_text(json.dumps(d))
    with pytest.raises(UnsupportedModelError, match=message):
        ModelSource.parse(str(w8a8_copy)).check()


def test_output_activations_and_packed_weights_with_activations_are_refused(w8a8_copy):
    config = w8a8_copy / "config.json"
    d = json.loads(config.read_text())
    group = d["quantization_config"]["config_groups"]["group_0"]
    group["output_activations"] = dict(group["input_activations"])
    config.write_text(json.dumps(d))
    with pytest.raises(UnsupportedModelError, match="output_activations"):
        ModelSource.parse(str(w8a8_copy)).check()
    group["output_activations"], group["format"] = None, "pack-quantized"
    config.write_text(json.dumps(d))
    with pytest.raises(UnsupportedModelError, match="format='pack-quantized'.*quantized activations"):
        ModelSource.parse(str(w8a8_copy)).check()


def test_weights_of_the_wrong_type_are_named(w8a8_copy):
    weights = w8a8_copy / "model.safetensors"
    name = "model.layers.2.mlp.up_proj.weight"
    tensors = load_file(weights)
    tensors[name] = tensors[name].float()
    save_file(tensors, weights)
    with pytest.raises(ValueError, match=rf"{name} is stored as torch.float32.*torch.int8"):
        LocalGroup(w8a8_copy, [1.0])
