"""Per-token cost of a JSON-schema token mask at SmolLM2's 49152-token vocabulary: xgrammar vs llguidance.

For each schema: compile once, then walk the tokens of a valid JSON answer, timing the mask of every step (the
work a constrained decode step adds on the host) and the advance by the chosen token. Prints one line per library
and schema: compile ms, mask us per token (median, p99), advance us per token.

    python benchmarks/grammar_mask_cost.py
"""

from __future__ import annotations

import json
import statistics
import time

from raytp.weights.smollm2 import pull_smollm2

SCHEMAS = {
    "object": ({"type": "object"}, {"a": 1, "b": [True, None, "x"], "c": {"d": 2.5}}),
    "person": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                 "tags": {"type": "array", "items": {"type": "string"}}},
                "required": ["name", "age", "tags"], "additionalProperties": False},
               {"name": "Ada Lovelace", "age": 36, "tags": ["mathematician", "writer"]}),
    "enum": ({"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 0}},
              "required": ["color", "count"], "additionalProperties": False}, {"color": "green", "count": 12}),
}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def report(name: str, compile_s: float, masks: list[float], advances: list[float]) -> None:
    masks_us = sorted(m * 1e6 for m in masks)
    p99 = masks_us[min(len(masks_us) - 1, int(0.99 * len(masks_us)))]
    print(f"{name:28s} compile {compile_s * 1e3:8.1f} ms   mask median {statistics.median(masks_us):7.1f} us  "
          f"p99 {p99:7.1f} us   advance {statistics.median(advances) * 1e6:6.1f} us   ({len(masks)} tokens)")


def main() -> None:
    import llguidance
    import llguidance.hf
    import llguidance.torch
    import transformers
    import xgrammar as xgr

    model_dir = pull_smollm2()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    vocab = len(tokenizer)
    print(f"vocabulary {vocab} tokens")
    xgr_info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=[eos])
    xgr_compiler = xgr.GrammarCompiler(xgr_info)
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos)
    for label, (schema, example) in SCHEMAS.items():
        ids = tokenizer.encode(json.dumps(example), add_special_tokens=False)

        compiled = []
        compile_s = timed(lambda: compiled.append(xgr_compiler.compile_json_schema(json.dumps(schema))))
        matcher = xgr.GrammarMatcher(compiled[0])
        bitmask = xgr.allocate_token_bitmask(1, vocab)
        masks, advances = [], []
        for t in ids:
            masks.append(timed(lambda: matcher.fill_next_token_bitmask(bitmask)))
            advances.append(timed(lambda: matcher.accept_token(t)))
        assert matcher.accept_token(eos) and matcher.is_terminated(), "xgrammar did not accept the example"
        report(f"xgrammar   {label}", compile_s, masks, advances)

        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        made = []
        compile_s = timed(lambda: made.append(llguidance.LLMatcher(ll_tokenizer, grammar)))
        matcher = made[0]
        bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
        masks, advances = [], []
        for t in ids:
            masks.append(timed(lambda: llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)))
            advances.append(timed(lambda: matcher.consume_token(t)))
        assert matcher.consume_token(eos) and not matcher.is_error(), matcher.get_error()
        report(f"llguidance {label}", compile_s, masks, advances)


if __name__ == "__main__":
    main()
