"""The sampling a checkpoint asks for by default, from its `generation_config.json`, as vLLM reads it.

Model authors ship the settings their model was tuned to answer with (Llama 3.1 Instruct: temperature 0.6, top_p
0.9; Qwen3: 0.6, 0.95, top_k 20). They are the defaults of `generate`, `chat`, the API and the web chat; a flag or a
request field overrides each. A field the file leaves out is off (top_p 1, top_k 0, repetition_penalty 1), and
without a temperature the default is greedy: a small model sampled at a guessed temperature answers nonsense where
it answers right greedily. `"do_sample": false` also means greedy, as in transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = 0.0  # greedy unless the model names a temperature
    top_p: float = 1.0  # off
    top_k: int = 0  # off (transformers' own default, 50, applies only where it samples itself)
    repetition_penalty: float = 1.0  # off
    source: str = "greedy: the model ships no generation_config.json"  # where these came from, for the user

    @classmethod
    def read(cls, model_dir: Path | None) -> SamplingDefaults:
        """The defaults of the Hugging Face directory `model_dir`; greedy for None (a synthetic model) or a directory
        without generation_config.json. ValueError naming the file where it is not JSON or a value is no number."""
        path = None if model_dir is None else Path(model_dir) / GENERATION_CONFIG
        if path is None or not path.is_file():
            return cls()
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path} ({e}); fix or delete it (raytp then samples greedily)") from None
        given = {f.name: config[f.name] for f in fields(cls) if f.name != "source" and config.get(f.name) is not None}
        bad = next((k for k, v in given.items() if isinstance(v, bool) or not isinstance(v, (int, float))), None)
        if bad is not None:
            raise ValueError(f"{path}: {bad} must be a number, got {json.dumps(given[bad])}")
        if "top_k" in given and given["top_k"] != int(given["top_k"]):
            raise ValueError(f"{path}: top_k must be a whole number, got {given['top_k']}")
        named = bool(given) or config.get("do_sample") is False
        if config.get("do_sample") is False or "temperature" not in given:
            given["temperature"] = 0.0
        values = {k: int(v) if k == "top_k" else float(v) for k, v in given.items()}
        return cls(**values, source=str(path) if named else f"greedy: {path} names no sampling settings")

    def describe(self) -> str:
        """One line for the user: what the defaults are and where they came from."""
        values = ", ".join(f"{f.name} {getattr(self, f.name):g}" for f in fields(self) if f.name != "source")
        return f"sampling defaults {values} ({self.source})"
