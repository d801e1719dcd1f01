"""A rank's slices of a Hugging Face safetensors checkpoint, read without loading whole tensors.

Every tensor is read with `safe_open(...).get_slice(name)[rows, cols]`, so a rank reads only the bytes of its own
shard from disk and no process ever holds the whole model. Which slices, and how they are fused, is the layers'
business (`raytp.model.layout`); this module only reads, and checks what it reads against the global shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from raytp.model.layout import Slice

_HEADER_LIMIT = 100 << 20  # the safetensors format caps its JSON header at 100 MB


class CheckpointError(ValueError):
    """A model directory cannot be used as it is: the message names the file and what to do about it."""


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header alone (8-byte length + JSON), checking that the file
    is as long as the header says: a truncated download or copy fails here, not halfway through loading."""
    size = path.stat().st_size
    fix = "re-download or re-convert the model"
    with path.open("rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if not 0 < n <= min(_HEADER_LIMIT, size - 8):
            raise CheckpointError(f"{path} is not a complete safetensors file ({size} bytes, header length "
                                  f"{n if n >= 0 else 'missing'}); {fix}")
        try:
            header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            shapes = {k: tuple(t["shape"]) for k, t in header.items() if k != "__metadata__"}
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({e}); {fix}") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{path} is truncated or corrupt: its header declares {8 + n + end} bytes, the file "
                              f"has {size}; {fix}")
    return shapes


def tensor_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file, for a sharded index or the *.safetensors files of the directory."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a safetensors index ({e}); re-download the model") from None
        return {name: model_dir / fname for name, fname in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {model_dir} (raytp never unpickles .bin/.pt files)")
    return {name: f for f in files for name in read_header(f)}


def check_slice(s: Slice, files: dict[str, Path], shape: tuple[int, ...] | None) -> None:
    """Raise if the checkpoint lacks tensor `s.name` (shape None) or stores it in another shape than `s.shape`."""
    if shape is None:
        raise CheckpointError(f"the checkpoint in {next(iter(files.values())).parent} has no tensor {s.name!r}, "
                              f"which config.json implies; the weights and config.json do not belong together")
    if shape != s.shape:
        raise CheckpointError(f"tensor {s.name!r} in {files[s.name]} has shape {shape}, config.json implies "
                              f"{s.shape}; the weights and config.json do not belong together")


def _check_finite(t: torch.Tensor, s: Slice, path: Path, why: str) -> None:
    """Refuse NaN or Inf in a floating-point tensor as it loads: one would turn every logit into NaN, and the sampler
    would fail far from the cause."""
    if not t.is_floating_point():
        return
    if t.element_size() == 1:  # float8: torch has no isfinite for it; its values are exact in float16
        t = t.to(torch.float16)
    if bool(torch.isfinite(t).all()):
        return
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    raise CheckpointError(f"tensor {s.name!r} in {path} holds {nan} NaN and {inf} Inf values; {why}")


class SafetensorsReader:
    """Reads `Slice`s of the checkpoint in `model_dir` in `dtype` onto `device` (the layers' WeightReader).

    With `progress`, a bar counts the bytes read from disk; leaving the `with` block closes it.
    """

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: torch.device, *, progress: bool = False,
                 desc: str = "loading"):
        self.files = tensor_files(model_dir)
        self.dtype, self.device = dtype, device
        self.handles = {f: safe_open(f, framework="pt") for f in set(self.files.values())}
        self.bar = tqdm(desc=desc, unit="B", unit_scale=True, disable=not progress, leave=False)

    def read(self, s: Slice, *, stored: bool = False) -> torch.Tensor:
        sl = self.handles[self.files[s.name]].get_slice(s.name) if s.name in self.files else None
        check_slice(s, self.files, None if sl is None else tuple(sl.get_shape()))
        index = (slice(None),) if s.stacked else ()  # every expert of a stacked tensor
        index += (slice(s.rows.start, s.rows.stop),) + (() if s.cols is None else (slice(s.cols.start, s.cols.stop),))
        t = sl[index]
        self.bar.update(t.numel() * t.element_size())
        if not stored and t.is_floating_point() and t.element_size() == 1:
            raise CheckpointError(f"tensor {s.name!r} in {self.files[s.name]} is stored in {t.dtype}, but "
                                  f"config.json's quantization_config leaves its module unquantized (raytp would "
                                  f"read the values without their scales); the weights and config.json do not "
                                  f"belong together")
        _check_finite(t, s, self.files[s.name], "the checkpoint is corrupt: re-download or re-convert it")
        out = t.to(self.device) if stored else t.to(self.device, self.dtype)
        _check_finite(out, s, self.files[s.name], f"its values overflow {self.dtype}: load it in a wider --dtype")
        return out

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
