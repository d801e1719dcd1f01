"""Quantize float Hugging Face model directories with llmcompressor:
`python llmcompressor_script.py SRC OUT SCHEME[,SCHEME...] [SRC OUT SCHEMES ...]`.

Run by `raytp pull smollm2 --quant SCHEME` (raytp.weights.smollm2_quantized) with the python of its own virtual
environment, because llmcompressor pins its own transformers; so this file imports nothing from raytp. For each
(SRC, OUT, SCHEMES), OUT/SCHEME gets each compressed-tensors checkpoint (`save_compressed=True`) and the tokenizer
files; several directories in one run pay the environment's start-up and imports once.

    w4a16             GPTQ, 4-bit symmetric, groups of 64 input columns, act-order "group" (writes weight_g_idx)
    w4a16-noactorder  round-to-nearest 4-bit with zero points (asymmetric), groups of 64
    w8a16             round-to-nearest 8-bit symmetric, one scale per output channel
    fp8               round-to-nearest float8 e4m3 weights, one scale per output channel
    fp8-dynamic       llmcompressor's FP8_DYNAMIC preset: fp8 weights as above, activations quantized to e4m3 per token
                      at run time (the checkpoint only says so in its config)
    w8a8              llmcompressor's W8A8 preset: int8 weights stored unpacked, one scale per output channel,
                      activations quantized to int8 per token at run time

Groups of 64, not 128: SmolLM2's hidden size 576 is not a multiple of 128. The round-to-nearest schemes need no
calibration and take seconds; GPTQ calibrates on a few sentences held here, so nothing is downloaded.
"""

import sys

from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer


def _weights(**args) -> dict:
    return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": args}}, "ignore": ["lm_head"]}


SCHEMES = {
    "w4a16": (GPTQModifier, _weights(num_bits=4, type="int", symmetric=True, strategy="group", group_size=64,
                                     actorder="group")),
    "w4a16-noactorder": (QuantizationModifier, _weights(num_bits=4, type="int", symmetric=False, strategy="group",
                                                        group_size=64)),
    "w8a16": (QuantizationModifier, _weights(num_bits=8, type="int", symmetric=True, strategy="channel")),
    "fp8": (QuantizationModifier, _weights(num_bits=8, type="float", symmetric=True, strategy="channel")),
    "fp8-dynamic": (QuantizationModifier, {"targets": "Linear", "scheme": "FP8_DYNAMIC", "ignore": ["lm_head"]}),
    "w8a8": (QuantizationModifier, {"targets": "Linear", "scheme": "W8A8", "ignore": ["lm_head"]}),
}

# GPTQ's calibration text: varied enough to exercise every layer, small enough to take seconds on two cores.
CALIBRATION = [
    "The capital of France is Paris, a city on the Seine.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Once upon a time, there was a little fox who lived at the edge of the forest.",
    "The mitochondria is the powerhouse of the cell.",
    "To bake bread, mix flour, water, salt and yeast, then let the dough rise.",
    "In 1969, Apollo 11 landed the first humans on the Moon.",
    "Please summarize the following article in three sentences.",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY name;",
    "The quick brown fox jumps over the lazy dog.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Can you recommend a good book about the history of mathematics?",
    "The stock market fell sharply on Monday after the interest rate announcement.",
    "Gravity bends light; 42 photons, café, naïve.",
    "A triangle has three sides and its angles add up to 180 degrees.",
    "The weather today is sunny with a light breeze from the west.",
    "Machine learning models learn patterns from data instead of following explicit rules.",
    "She opened the door slowly and stepped into the dark room.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10",
    "Translate to French: I would like a cup of coffee, please.",
    "The heart pumps blood through the arteries and veins of the body.",
    "Shakespeare wrote Hamlet, Macbeth and Romeo and Juliet.",
    "for (int i = 0; i < n; i++) { sum += a[i]; }",
    "Name three colors: red, green and blue.",
    "The Pacific Ocean is the largest and deepest ocean on Earth.",
    "Electric cars use batteries instead of gasoline engines.",
    "What is the square root of 144? It is 12.",
    "The museum opens at nine in the morning and closes at six.",
    "Bees pollinate flowers while collecting nectar to make honey.",
    "Write a short poem about the sea at night.",
    "The treaty was signed after years of difficult negotiations.",
    "Tokyo, Delhi and Shanghai are among the most populous cities in the world.",
]


def quantize(src: str, dst: str, scheme: str) -> None:
    modifier, config = SCHEMES[scheme]
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(src)
    recipe = modifier(**config)
    if modifier is GPTQModifier:
        data = Dataset.from_dict({"text": CALIBRATION})
        oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe, max_seq_length=64,
                num_calibration_samples=len(CALIBRATION))
    else:
        oneshot(model=model, recipe=recipe)
    model.save_pretrained(dst, save_compressed=True)
    tokenizer.save_pretrained(dst)


if __name__ == "__main__":
    jobs = sys.argv[1:]
    if not jobs or len(jobs) % 3:
        sys.exit(f"usage: {sys.argv[0]} SRC OUT SCHEME[,SCHEME...] [SRC OUT SCHEMES ...]")
    for source, out, schemes in zip(jobs[0::3], jobs[1::3], jobs[2::3]):
        for name in schemes.split(","):
            quantize(source, f"{out}/{name}", name)
