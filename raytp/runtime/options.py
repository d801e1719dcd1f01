"""Debugging switches every rank obeys: one frozen `RuntimeOptions`, carried to each rank inside GroupSettings.

Which kernel runs is never a user's choice: each operation has one path per device, chosen by measurement (Triton
kernels on GPUs, torch on CPUs). What is left here switches a fast path off to debug or compare it, or adds checks.
Each field is declared once: its default, its CLI flag (which sets it to the opposite of the default) and the flag's
help live in the field; its environment variable is RAYTP_ and the field's name in capitals (`env_name`).
`RuntimeOptions.from_env` is the one place where raytp reads RAYTP_* variables at run time, as the flags' defaults
in the process that starts the group (scripts and CI jobs that export them keep working). Ranks never read the
environment: what they run is what the options say, wherever Ray starts them. (RAYTP_HOME, where models are cached,
and RAYTP_API_KEY, `serve --api-key`'s default, are not run-time switches.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields


def _switch(default: bool, flag: str, help: str):
    return field(default=default, metadata={"flag": flag, "help": help})


@dataclass(frozen=True)
class RuntimeOptions:
    triton: bool = _switch(True, "--no-triton", "run the torch version of every kernel, also on GPUs (debugging, "
                                               "comparing the two)")
    cuda_graphs: bool = _switch(True, "--no-cuda-graphs", "decode eagerly on GPUs instead of replaying CUDA graphs "
                                                          "(debugging, profiling eager steps)")
    check_identical: bool = _switch(False, "--check-identical", "check after every all-reduce that all ranks hold "
                                                                "identical bits (one extra collective each: for tests)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> RuntimeOptions:
        """The options the RAYTP_* variables in `environ` ask for; defaults elsewhere: a switch that is on by
        default goes off only at "0", one that is off goes on only at "1"."""
        def value(f) -> bool:
            given = environ.get(env_name(f.name))
            return given != "0" if f.default else given == "1"

        return cls(**{f.name: value(f) for f in fields(cls)})

    def flags(self) -> list[str]:
        """The CLI flags that give these options whatever the environment says (for reproducible commands)."""
        return [f.metadata["flag"] for f in fields(self) if getattr(self, f.name) != f.default]


def env_name(field_name: str) -> str:
    """The RAYTP_* variable that gives a RuntimeOptions field its default: RAYTP_ and the field's name."""
    return "RAYTP_" + field_name.upper()


# Each field's CLI flag and the flag's help, read from the fields (for the CLI's parser)
FLAGS = {f.name: (f.metadata["flag"], f.metadata["help"]) for f in fields(RuntimeOptions)}
