"""GPTQ and AWQ slices read through raytp.model.formats (the same reader as compressed-tensors', from safetensors
files) against the format libraries' own dequantization (tests/quant_reference)."""

import pytest
import torch
from safetensors.torch import save_file

from raytp.model.config import UnsupportedModelError
from raytp.model.formats import read_linear
from raytp.model.layout import Slice
from raytp.model.quant.registry import METHODS, quant_config
from raytp.weights.checkpoint import SafetensorsReader
from tests.quant_reference import dequantize_gemm, gptq_dequantize_weight

OUT, IN = 48, 320
# Rows 12..40 start mid-word of the zero points (4 of 8 nibbles in); columns 96..256 start 32 into group 1 of 64
# and span 3 groups: an odd count, with partial first group; columns 4..68 start mid-word of 4-bit packing.
SLICES = [dict(rows=range(OUT), cols=None), dict(rows=range(12, 40), cols=None),
          dict(rows=range(OUT), cols=range(96, 256)), dict(rows=range(8, 16), cols=range(0, 64)),
          dict(rows=range(5, 29), cols=range(4, 68))]


def random_words(shape, g, bits, top=None):
    """int32 words of random `bits`-bit fields, each field below `top` (all values when None)."""
    per = 32 // bits
    fields = torch.randint(0, top or 1 << bits, (*shape, per), generator=g, dtype=torch.int64)
    words = (fields << torch.arange(0, 32, bits)).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).int()


def gptq_tensors(bits, group_size, desc_act, checkpoint_format, sym, seed=0):
    g = torch.Generator().manual_seed(seed)
    per, n_groups = 32 // bits, IN // group_size
    g_idx = torch.arange(IN) // group_size
    if desc_act:
        g_idx = g_idx[torch.randperm(IN, generator=g)]
    # AutoGPTQ's v1 stores zero - 1; a stored field of 2**bits - 1 would carry into its neighbour under GPTQModel's
    # whole-word + 1, so v1 checkpoints never hold one. Symmetric ones hold the midpoint (minus one in v1).
    v1 = checkpoint_format == "gptq"
    if sym:
        mid = (1 << (bits - 1)) - v1
        qzeros = random_words((n_groups, OUT // per), g, bits, top=1) + sum(mid << s for s in range(0, 32, bits))
        qzeros = torch.where(qzeros >= 1 << 31, qzeros.long() - (1 << 32), qzeros.long()).int()
    else:
        qzeros = random_words((n_groups, OUT // per), g, bits, top=(1 << bits) - v1)
    return {"m.qweight": random_words((IN // per, OUT), g, bits), "m.qzeros": qzeros,
            "m.scales": (torch.rand(n_groups, OUT, generator=g) * 0.02 + 1e-3).half(), "m.g_idx": g_idx.int()}


def read(tmp_path, tensors, s: Slice):
    save_file(tensors, tmp_path / "model.safetensors")
    with SafetensorsReader(tmp_path, torch.float16, torch.device("cpu")) as reader:
        return read_linear(reader, s)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("sym", [False, True])
def test_gptq_slices_dequantize_like_gptqmodel(tmp_path, bits, desc_act, checkpoint_format, sym):
    tensors = gptq_tensors(bits, 64, desc_act, checkpoint_format, sym)
    quant = quant_config({"quant_method": "gptq", "bits": bits, "group_size": 64, "desc_act": desc_act,
                                   "sym": sym, "checkpoint_format": checkpoint_format})
    reference = gptq_dequantize_weight(tensors["m.qweight"], tensors["m.qzeros"], tensors["m.scales"],
                                       tensors["m.g_idx"], bits, checkpoint_format).t()  # (out, in)
    for s in SLICES:
        w = read(tmp_path, tensors, Slice("m.weight", (OUT, IN), s["rows"], s["cols"], quant))
        cols = s["cols"] or range(IN)
        assert w.packed.shape == (len(s["rows"]), len(cols) * bits // 32)
        assert (w.zeros is None) == sym  # a symmetric checkpoint's zero points are the midpoint: not read
        assert (w.g_idx is not None) == desc_act
        # both compute (q - zero) in integers and round one product to float16: the same bits
        assert torch.equal(w.dequantize(), reference[s["rows"].start:s["rows"].stop, cols.start:cols.stop])


def test_gptq_refuses_what_it_cannot_read():
    with pytest.raises(UnsupportedModelError, match="bits=3.*raytp reads"):
        quant_config({"quant_method": "gptq", "bits": 3, "group_size": 128})
    with pytest.raises(UnsupportedModelError, match="checkpoint_format='marlin'"):
        quant_config({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"})
    with pytest.raises(UnsupportedModelError, match="quantized lm_head"):
        quant_config({"quant_method": "gptq", "bits": 4, "lm_head": True})


AWQ_OUT, AWQ_IN, AWQ_GROUP = 64, 384, 128


def test_awq_slices_dequantize_like_autoawq(tmp_path):
    g = torch.Generator().manual_seed(1)
    n_groups = AWQ_IN // AWQ_GROUP
    tensors = {"m.qweight": random_words((AWQ_IN, AWQ_OUT // 8), g, 4),
               "m.qzeros": random_words((n_groups, AWQ_OUT // 8), g, 4),
               "m.scales": (torch.rand(n_groups, AWQ_OUT, generator=g) * 0.02 + 1e-3).half()}
    reference = dequantize_gemm(tensors["m.qweight"], tensors["m.qzeros"], tensors["m.scales"], 4, AWQ_GROUP).t()
    quant = quant_config({"quant_method": "awq", "bits": 4, "group_size": AWQ_GROUP, "version": "GEMM",
                                   "zero_point": True})
    for rows, cols in [(range(AWQ_OUT), None), (range(12, 52), None), (range(AWQ_OUT), range(136, 384)),
                       (range(3, 9), range(0, 128)), (range(3, 9), range(4, 100))]:
        w = read(tmp_path, tensors, Slice("m.weight", (AWQ_OUT, AWQ_IN), rows, cols, quant))
        cols = cols or range(AWQ_IN)
        assert torch.equal(w.dequantize(), reference[rows.start:rows.stop, cols.start:cols.stop])


def test_awq_refuses_other_layouts():
    with pytest.raises(UnsupportedModelError, match="version='gemv'"):
        quant_config({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"})
    assert not quant_config({"quant_method": "awq", "modules_to_not_convert": ["down_proj"]}).quantizes(
        "model.layers.3.mlp.down_proj")


def compressed_tensors(fmt: str, weights: dict, **group) -> dict:
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
            "config_groups": {"g": {"targets": ["Linear"], "weights": weights, **group}}}


# A config of every checkpoint method raytp reads, with zero points and act-order where the method has them
EVERY_METHOD = [
    compressed_tensors("pack-quantized", {"type": "int", "num_bits": 4, "strategy": "group", "group_size": 64,
                                          "symmetric": False, "actorder": "group"}),
    compressed_tensors("float-quantized", {"type": "float", "num_bits": 8, "strategy": "tensor"}),
    compressed_tensors("int-quantized", {"type": "int", "num_bits": 8, "strategy": "channel"},
                       input_activations={"type": "int", "num_bits": 8, "strategy": "token", "dynamic": True}),
    {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True, "sym": False},
    {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm"},
    {"quant_method": "fp8", "weight_block_size": [32, 64]},
]


# Methods that store one projection of every expert in a tensor (not a Linear matrix), with tests of their own
STACKED_EXPERTS = {"mxfp4": "tests/test_mxfp4.py"}


def test_every_method_is_covered():
    assert {c["quant_method"] for c in EVERY_METHOD} | set(STACKED_EXPERTS) == set(METHODS)


@pytest.mark.parametrize("config", EVERY_METHOD, ids=lambda c: c["quant_method"] + "-" + str(c.get("format", "")))
def test_every_method_reads_only_the_tensors_it_declares(config):
    """What `raytp check` compares with a checkpoint's headers (`stored_tensors`) is what reading a slice touches,
    in the declared shapes, rows and columns within them (a recording reader of random values of each declared
    dtype; the group index a valid one)."""
    quant = quant_config(config)
    assert quant.quant_method == config["quant_method"]
    declared = quant.stored_tensors("m.weight", (OUT, IN))
    touched = set()

    class Recording:
        dtype = torch.float32

        def read(self, s: Slice, *, stored: bool = False) -> torch.Tensor:
            assert s.name in declared and s.shape == declared[s.name].shape, (s.name, s.shape)
            cols = s.cols if s.cols is not None else range(s.shape[1]) if len(s.shape) > 1 else None
            assert s.rows.stop <= s.shape[0] and (cols is None or cols.stop <= s.shape[1])
            touched.add(s.name)
            shape, dtype = (len(s.rows),) + ((len(cols),) if cols is not None else ()), declared[s.name].dtype
            if len(s.shape) == 1:  # the act-order group index
                return (torch.arange(IN) // 64).int()[s.rows.start:s.rows.stop]
            if dtype in (torch.int32, torch.int8):
                return torch.randint(-100, 100, shape, dtype=dtype)
            values = torch.rand(shape) + 0.5
            return values.to(dtype) if stored else values

    for part in SLICES:
        weight = read_linear(Recording(), Slice("m.weight", (OUT, IN), part["rows"], part["cols"], quant))
        assert weight.dequantize().shape == (len(part["rows"]), len(part["cols"] or range(IN)))
    assert touched == {name for name, t in declared.items() if name != "m.weight_shape"}
