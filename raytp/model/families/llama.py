"""Llama 2/3 (and SmolLM) and Mistral: the decoder the others vary; Mistral adds only its sliding window."""

from raytp.model.families.base import Family, sliding_everywhere

LLAMA = Family("llama", "LlamaForCausalLM")
MISTRAL = Family("mistral", "MistralForCausalLM", sliding_everywhere)
