"""The model: one rank's shard of a Llama-family decoder.

    architecture.py  one declaration per model family (q/k/v bias, q/k norms)
    config.py   ModelConfig, read from a Hugging Face config.json (errors.py: what a bad one raises)
    layout.py   which Hugging Face tensors, rows and columns each rank holds (the one place that says so);
                slice.py: one such `Slice`
    quant/      one file per checkpoint method (compressed-tensors, GPTQ, AWQ, fine-grained FP8): its config,
                the tensors it stores, the reading of a rank's slice
    pieces.py   what the model can split, and what each rank holds whole: its declaration to the planner
    kv_cache.py the KV cache (model dtype or FP8): write, attend, bytes per row
    formats/    one object per weight format: how a Linear slice is held, counted and applied (dense, packed
                int4/int8, float8, activation-quantized)
    layers.py   parallel layers that own their uneven slice (column/row-parallel linear, vocab-parallel
                embedding and head)
    llama.py    the decoder forward of one rank
    moe.py      a mixture-of-experts block of one rank: the router replicated, its columns of every expert
    graphs.py   the decode step replayed from CUDA graphs

May import: raytp.parallel (plan, comm), raytp.kernels. Never raytp.weights, runtime, actors or above.
"""
