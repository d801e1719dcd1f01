"""Checkpoint methods: how a checkpoint stores its quantized Linear layers. One file per method (vLLM's
`quantization/`), each a `QuantConfig` (`base.py` fixes the contract) that parses and refuses its config.json
`quantization_config`, names the tensors it stores for a matrix and reads a rank's slice of them into a weight
object of `raytp.model.formats`:

    compressed_tensors.py  llmcompressor's W4A16, W8A16, FP8, FP8_DYNAMIC, W8A8
    gptq.py                GPTQModel / AutoGPTQ
    awq.py                 AutoAWQ (GEMM)
    autogptq.py            the tensors those two share (AutoGPTQ's qweight, scales, qzeros, g_idx)
    fp8_blocks.py          transformers' fine-grained FP8 (block scales)

    registry.py            METHODS by quant_method, and `quant_config`, which parses a quantization_config

A new method is one more file and one more entry in METHODS. (This package's __init__ imports nothing: the weight
formats import `base` while the methods import the formats.)
"""
