"""Llama 2/3 (and SmolLM) and Mistral: the decoder the others vary; nothing beyond the common fields."""

from raytp.model.families.base import Family

LLAMA = Family("llama", "LlamaForCausalLM")
MISTRAL = Family("mistral", "MistralForCausalLM")
