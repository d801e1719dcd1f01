"""The device spec every command takes (`--devices`): which devices get a rank, and how much memory each may use.

    cpu@3GiB,cpu@2GiB,cpu@1GiB     three CPU ranks with explicit budgets (uneven on purpose)
    cuda:0@24GiB,cuda:1@80GiB      two named GPUs
    cuda*2@40GiB                   two GPUs, indexes chosen by the runtime, 40 GiB each
    cuda:0@24GiB~0.94TB/s          a GPU with its memory bandwidth, for the speed split (`--split speed`)
    cpu*4                          four CPU ranks, budget measured by the runtime
    auto                           every GPU of the cluster; see `is_auto`

A device without `@MEM` gets `mem_bytes=None`: the runtime measures its free memory; without `~RATE`,
`bandwidth=None`: the runtime measures it on GPUs. `auto` needs the cluster, so it is expanded by the runtime,
never here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from functools import partial

KINDS = ("cpu", "cuda")
SYNTAX = ("comma-separated KIND[:INDEX][@MEM][~RATE] or KIND*COUNT[@MEM][~RATE], KIND cpu or cuda, MEM like 512MiB, "
          "1.5GiB or 2GB, RATE (memory bandwidth) like 0.94TB/s or 936GB/s")
EXAMPLE = "cuda:0@24GiB,cuda:1@80GiB"
# ranks in one spec: far beyond any tensor-parallel group (each rank holds a slice of every layer), and a bound on
# the list that parsing builds, so `cpu*99999999999` is refused instead of filling memory
MAX_RANKS = 1024

# Largest first: format picks the first unit that writes a size with at most two decimals.
_UNITS = {
    "TiB": 2**40, "TB": 10**12, "GiB": 2**30, "GB": 10**9,
    "MiB": 2**20, "MB": 10**6, "KiB": 2**10, "KB": 10**3, "B": 1,
}
_UNIT_BY_LOWER = {unit.lower(): size for unit, size in _UNITS.items()}
_SIZE = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))([a-z]*)", re.IGNORECASE)
_ITEM = re.compile(r"([a-z]+)(?::(\d+)|\*(\d+))?(?:@([^~]+))?(?:~(.+))?", re.IGNORECASE)
_RATE = re.compile(r"((?:\d+(?:\.\d*)?|\.\d+))([tgm])b/s", re.IGNORECASE)


class DeviceSpecError(ValueError):
    """A `--devices` string that does not parse; the message quotes the bad item and the accepted syntax."""


@dataclass(frozen=True)
class DeviceSpec:
    kind: str  # "cpu" or "cuda"
    index: int | None  # explicit CUDA index; None lets the runtime pick (always None for cpu)
    mem_bytes: int | None  # budget for this rank; None: the runtime measures free memory
    bandwidth: float | None = None  # memory bandwidth in bytes/s; None: measured on GPUs, unknown on CPUs

    @property
    def name(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    def __str__(self) -> str:
        mem = "" if self.mem_bytes is None else f"@{_compact_bytes(self.mem_bytes)}"
        rate = "" if self.bandwidth is None else f"~{self.bandwidth / 1e9:g}GB/s"
        return f"{self.name}{mem}{rate}"


def is_auto(spec: str) -> bool:
    """True for `auto`, which the runtime expands to every GPU of the cluster at its free memory."""
    return spec.strip().lower() == "auto"


def parse_devices(spec: str) -> list[DeviceSpec]:
    """Parse a device spec into one DeviceSpec per rank, in rank order. `auto` is refused: test `is_auto` first."""
    if is_auto(spec):
        raise DeviceSpecError("'auto' is expanded by the runtime from the cluster; check is_auto(spec) before parsing")
    if not spec.strip():
        raise DeviceSpecError(f"empty device spec; expected {SYNTAX}, e.g. {EXAMPLE!r}")
    devices: list[DeviceSpec] = []
    seen_cuda: set[int] = set()
    for raw in spec.split(","):
        item = "".join(raw.split())  # whitespace tolerated anywhere: "cuda:0 @ 24 GiB"
        bad = partial(_bad_item, raw.strip(), spec)
        match = _ITEM.fullmatch(item)
        if not item or not match:
            raise bad("empty item" if not item else "not of the form KIND[:INDEX][@MEM][~RATE] or KIND*COUNT[@MEM][~RATE]")
        kind, index, count, mem, rate = (match.group(i) for i in range(1, 6))
        kind = kind.lower()
        if kind not in KINDS:
            raise bad(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
        if count is not None and (len(count) > len(str(MAX_RANKS)) or not 1 <= int(count) <= MAX_RANKS):
            raise bad(f"count must be in 1..{MAX_RANKS}, got {count}")
        if index is not None:
            if kind == "cpu":
                raise bad("cpu takes no index; use cpu*N for several CPU ranks")
            if int(index) in seen_cuda:
                raise bad(f"cuda:{index} is listed twice")
            seen_cuda.add(int(index))
        mem_bytes = None
        if mem is not None:
            try:
                mem_bytes = parse_bytes(mem)
            except ValueError as e:
                raise bad(str(e)) from None
            if mem_bytes <= 0:
                raise bad(f"memory must be positive, got {mem!r}")
        bandwidth = None
        if rate is not None:
            rate_match = _RATE.fullmatch(rate)
            if not rate_match or float(rate_match.group(1)) <= 0:
                raise bad(f"bad bandwidth {rate!r}: expected a positive rate in TB/s, GB/s or MB/s, e.g. 0.94TB/s")
            bandwidth = float(rate_match.group(1)) * {"t": 1e12, "g": 1e9, "m": 1e6}[rate_match.group(2).lower()]
        device = DeviceSpec(kind, None if index is None else int(index), mem_bytes, bandwidth)
        devices.extend([device] * (1 if count is None else int(count)))
        if len(devices) > MAX_RANKS:
            raise DeviceSpecError(f"{spec!r} has more than {MAX_RANKS} ranks; a tensor-parallel group of that many "
                                  "devices would give each a sliver of every layer")
    return devices


def _bad_item(item: str, spec: str, why: str) -> DeviceSpecError:
    return DeviceSpecError(f"bad device {item!r} in {spec!r}: {why}; expected {SYNTAX}, e.g. {EXAMPLE!r}")


def parse_bytes(s: str) -> int:
    """`512MiB`, `1.5GiB`, `2GB`, `800MB`, `4096B` -> bytes (binary and decimal units; fractions round down)."""
    match = _SIZE.fullmatch("".join(s.split()))
    size = _UNIT_BY_LOWER.get(match.group(2).lower()) if match else None
    if size is None:
        raise ValueError(f"bad memory size {s!r}: expected a number and a unit ({', '.join(_UNITS)}), e.g. 3GiB")
    return int(Fraction(match.group(1)) * size)  # exact: 1.5GiB is 1610612736, not a float approximation


def format_bytes(n: int) -> str:
    """Human size for tables and errors: `3.00 GiB`, `512.0 MiB`, `12 B`."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, size, digits in (("TiB", 2**40, 2), ("GiB", 2**30, 2), ("MiB", 2**20, 1), ("KiB", 2**10, 1)):
        if n >= size:
            return f"{sign}{n / size:.{digits}f} {unit}"
    return f"{sign}{n} B"


def _compact_bytes(n: int) -> str:
    """Spec-style size that parses back to exactly `n`: `24GiB`, `1.5GiB`, `800MB`, `1000001B`."""
    for unit, size in _UNITS.items():
        if n >= size and n * 100 % size == 0:
            hundredths = n * 100 // size
            whole, frac = divmod(hundredths, 100)
            return f"{whole}{unit}" if frac == 0 else f"{whole}.{frac:02d}".rstrip("0") + unit
    return f"{n}B"
