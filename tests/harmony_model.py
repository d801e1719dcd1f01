"""A tokenizer directory that speaks harmony (gpt-oss's chat format), for tests without gpt-oss's 200k vocabulary:
byte-level, one token per byte, plus harmony's control tokens as special tokens, and gpt-oss's published
chat_template.jinja (tests/data/chat_templates: llama.cpp's models/templates copy, as vendored in the
llama-cpp-python 0.3.16 sdist). Its files are laid out as gpt-oss's are: tokenizer_config.json's eos is <|return|>,
generation_config.json lists <|return|>, <|endoftext|> and <|call|>."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

TEMPLATE = Path(__file__).parent / "data" / "chat_templates" / "openai-gpt-oss-120b.jinja"
# o200k_harmony's control tokens, in its order
CONTROL = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>", "<|end|>",
           "<|message|>", "<|call|>"]


def write_harmony_tokenizer(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL])
    tokenizer.save(str(folder / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in CONTROL}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|startoftext|>", "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>", "model_max_length": 131072}))
    (folder / "generation_config.json").write_text(json.dumps({
        "bos_token_id": ids["<|startoftext|>"], "pad_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]]}))
    (folder / "chat_template.jinja").write_text(TEMPLATE.read_text())
    return folder
