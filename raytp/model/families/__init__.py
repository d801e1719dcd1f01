"""The model families raytp runs: one file each, and one line each in FAMILIES.

A family's file reads its config.json (what `raytp.model.config.common_fields` does not: layer types, windows,
norms, experts) and names its tensors (`Family.names`); the layer kinds it is built of are shared
(`raytp.model.kinds`). The registry imports no torch: the CLI reads configs before it needs any.
"""

from __future__ import annotations

from raytp.model.families.base import Family, LayerNames
from raytp.model.families.gemma3 import GEMMA3
from raytp.model.families.gpt_oss import GPT_OSS
from raytp.model.families.llama import LLAMA, MISTRAL
from raytp.model.families.mixtral import MIXTRAL
from raytp.model.families.qwen2 import QWEN2
from raytp.model.families.qwen3 import QWEN3
from raytp.model.families.qwen3_5 import QWEN3_5, QWEN3_5_MOE, QWEN3_5_MOE_TEXT, QWEN3_5_TEXT
from raytp.model.families.qwen3_moe import QWEN3_MOE

__all__ = ["FAMILIES", "Family", "LayerNames"]

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    LLAMA,
    MISTRAL,
    QWEN2,
    QWEN3,
    QWEN3_MOE,
    MIXTRAL,
    GEMMA3,
    QWEN3_5,
    QWEN3_5_TEXT,
    QWEN3_5_MOE,
    QWEN3_5_MOE_TEXT,
    GPT_OSS,
)}
