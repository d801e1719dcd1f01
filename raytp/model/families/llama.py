"""Llama 2/3 (and SmolLM) and Mistral: the decoder the others vary; Mistral has no attention biases and keeps a
sliding window."""

from raytp.model.families.base import Family, mistral_attention

LLAMA = Family("llama", "LlamaForCausalLM")
MISTRAL = Family("mistral", "MistralForCausalLM", mistral_attention)
