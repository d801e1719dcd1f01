"""The model: one rank's shard of a decoder, built of shared layer kinds.

    families/   one file per model family: its config.json reading and tensor names; a registry line each
    config.py   ModelConfig, read from a Hugging Face config.json (config_fields.py: what every family reads
                alike; errors.py: what a bad one raises)
    kinds.py    the contract of a layer kind: its layout, its pieces, its state, its forward
    attention.py  full and sliding-window attention (kinds); mlp.py the dense MLP (kind); moe.py experts (kind);
                stacked_moe.py gpt-oss's experts, every expert's projection in one tensor (kind)
    layout.py   which Hugging Face tensors, rows and columns each rank holds (the one place that says so), each
                layer's kinds (MIXERS, MIXTURES); slice.py: one such `Slice`
    quant/      one file per checkpoint method (compressed-tensors, GPTQ, AWQ, fine-grained FP8, MXFP4): its config,
                the tensors it stores, the reading of a rank's slice
    pieces.py   what the model can split, and what each rank holds whole: the sum of its layers' declarations
    state.py    the interface of a layer's per-sequence state; kv_cache.py the KV and window caches (model
                dtype or FP8): write, attend, bytes per row
    rope.py     RoPE angles per mixer kind
    formats/    one object per weight format: how a Linear slice is held, counted and applied (dense, packed
                int4/int8, float8, activation-quantized, MXFP4)
    layers.py   parallel layers that own their uneven slice (column/row-parallel linear, vocab-parallel
                embedding and head)
    llama.py    the decoder forward of one rank, shared by every family
    experts.py  how a rank holds and runs its columns of every expert
    graphs.py   the decode step replayed from CUDA graphs

May import: raytp.parallel (plan, comm), raytp.kernels. Never raytp.weights, runtime, actors or above.
"""
