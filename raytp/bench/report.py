"""The files of a `raytp bench` sweep: results.csv, results.json, summary.md and four PNG plots.

    results.csv    one row per configuration (device set x quantization x backend x prompt length x batch), `COLUMNS`
                   in order; skipped and failed configurations too, with the reason
    results.json   the same rows, the full measurements of every group (plan, per-rank figures, all-reduce latency
                   per size, greedy tokens) and how the sweep was run
    summary.md     the table, the quantizations side by side (when several ran), what was skipped and why, how each
                   group split the model's pieces (whichever the model declares), the per-rank step profiles
                   (`raytp bench --profile`), how each figure is obtained, the plots
    scaling.png    decode tokens/s against rank count, with ideal linear scaling and the memory roofline, one series
                   per (quantization, backend)
    breakdown.png  ms per decode step split into compute, all-reduce and overhead (estimated, see `NOTES`)
    allreduce.png  all-reduce latency against message size, per backend and rank count
    prefill.png    prefill tokens/s against rank count

Plots use matplotlib's Agg backend: no display is needed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from raytp.bench.profile import CLASSES, LABELS
from raytp.model.config import NO_QUANT
from raytp.parallel.devices import format_bytes, is_auto, parse_devices
from raytp.parallel.plan import DTYPE_BYTES
from raytp.runtime.speculation import ORACLE

COLUMNS = [
    "devices", "ranks", "nodes", "comm", "backend", "split", "dtype", "quant", "prompt_len", "batch", "decode_tokens",
    "status", "reason", "ms_per_token", "tokens_per_s", "speculate", "tokens_per_step", "acceptance",
    "position_acceptance",
    "ideal_tokens_per_s", "scaling_efficiency",
    "roofline_tokens_per_s", "roofline_fraction", "read_bytes_per_step", "compute_ms", "allreduce_ms", "overhead_ms",
    "allreduces_per_step", "allreduce_us", "prefill_ms", "prefill_tokens_per_s", "hf_tokens_per_s", "hf_same_tokens",
    "build_s",
]
PLOTS = ("scaling.png", "breakdown.png", "allreduce.png", "prefill.png")

NOTES = """\
- **tokens/s**: the tokens of the steps timed over their seconds; a plain step decodes one token for every request
  of the batch, so tokens/s is batch x 1000 / ms per step and ms/token the step time a single request sees. Steps
  are timed on the leader rank, only those in which the whole batch decodes, after one warm-up run per batch size;
  the median of the repeats is kept. With `--speculate` a verify step may emit several tokens per request:
  **tokens_per_step** (a request's, in the timed steps), **acceptance** (drafted tokens accepted over drafted) and
  **position_acceptance** (a drafted token's chance of acceptance where every one before it in its draft was: the
  accepted tokens over themselves and each draft's first wrong one) are in results.csv and the table.
  `oracle:RATE` rows ran the benchmark drafter (raytp.runtime.oracle): it proposes the target's own tokens, taken
  from the warm-up run of the same prompts, each right with probability RATE, so position_acceptance comes out near
  RATE; such a row measures what speculation gains at that acceptance, not what any real drafter achieves.
- **ideal**: the run with the fewest ranks of the same quantization, backend, batch and prompt length, scaled
  linearly in the rank count. **of ideal** = measured / ideal.
- **roofline**: the bytes each rank must read per decode step (its weights bar the embedding table, as the planner
  counts them in the run's quantization: packed values, scales and zero points; plus its KV cache at the mean
  context) divided by its measured memory bandwidth (a large device copy); the slowest rank sets the step.
  roofline tokens/s is what a step at that time would give; read_bytes_per_step in results.csv is all ranks' bytes.
- **quant**: `none` is every weight in the model dtype; w4a16, w8a16 and fp8 quantize the attention and MLP weights
  (raytp.model.config.QUANT_PRESETS; embeddings, norms and lm_head stay in the model dtype). In the side-by-side
  table each quantization's tokens/s is divided by the unquantized run's (or the first quantization's where none
  ran unquantized) of the same device set, backend, prompt and batch; "fewer bytes read" compares their
  read_bytes_per_step: the speed-up a decode bound by memory alone would get (the bytes, unlike the roofline
  tokens/s, do not depend on the bandwidth each group measured).
- **breakdown** (an estimate from separate measurements, not a profile of the step):
  compute = the roofline time above; all-reduce = the all-reduce latency measured on the idle group at the decode
  message size (batch x hidden elements, in the run's dtype, slowest rank) x the all-reduces of one step (one for
  the embedding, two per layer); overhead = the measured step - compute - all-reduce: kernel launches, Python,
  sampling and its gathers, the per-step command broadcast, and whatever the other two estimates miss. A negative
  overhead means the estimates over-count (e.g. all-reduces faster inside the step than on the idle group); the
  plot draws it as zero.
- **step profile** (`--profile`, measured, unlike the breakdown above): after the timed runs, one more run per
  batch size in which every rank traces a few decode steps with torch.profiler. A step runs from the end of one
  step to the end of the next on the rank's token loop, so it holds the command broadcast, the forward, sampling and
  its host sync. Each GPU kernel, copy and memset (each torch op on a CPU rank) is classed by its name
  (raytp.bench.profile.PATTERNS): weight GEMMs; attention; all-reduce (every collective: the all-reduces, the
  sampler's all-gather, the command broadcast); small kernels (everything else: norms, RoPE, SwiGLU, embedding,
  sampling, copies); idle is the time the device runs nothing (waiting for the host). Overlapping time counts once,
  for the event that started first, so the classes add up to the step. "decode" says whether the steps replayed
  CUDA graphs or launched kernels eagerly. The profiler costs a few microseconds of host time per torch op, so
  steps with many ops (eager, CPU ranks) run slower profiled than timed: compare "step ms" with "timed ms/step".
- **prefill tokens/s**: prompt tokens / the time from the leader queuing one request to its first token (the
  command broadcast, the prefill forward and the first sample), on the leader's clock.
"""


def build_rows(sweep: dict, peer: dict | None = None) -> list[dict]:
    """One dict per configuration with every column of `COLUMNS` (None where not measured)."""
    rows = []
    for o in sweep["outcomes"]:
        row = dict.fromkeys(COLUMNS)
        row |= {"devices": o["devices"], "quant": o["quant"], "comm": o["comm"], "split": o.get("split"),
                "prompt_len": o["prompt_len"], "batch": o["batch"], "status": o["status"],
                "reason": o["reason"] or None}
        if o["run"] is not None:
            run = sweep["runs"][o["run"]]
            d = next(x for x in run["decode"] if x["batch"] == o["batch"])
            row |= {
                "ranks": len(run["devices"]), "nodes": run["nodes"], "backend": run["backend"], "dtype": run["dtype"],
                "decode_tokens": run["decode_tokens"], "ms_per_token": d["ms_per_token"],
                "tokens_per_s": d["tokens_per_s"], "speculate": d.get("speculate"),
                "tokens_per_step": d.get("tokens_per_step"), "acceptance": d.get("acceptance"),
                "position_acceptance": d.get("position_acceptance"),
                "roofline_tokens_per_s": 1000 * d["batch"] / d["roofline_ms"],
                "roofline_fraction": d["roofline_fraction"], "read_bytes_per_step": sum(d["read_bytes_per_step"]),
                "compute_ms": d["compute_ms"],
                "allreduce_ms": d["allreduce_ms"], "overhead_ms": d["overhead_ms"],
                "allreduces_per_step": run["allreduces_per_step"], "allreduce_us": d["allreduce_us"],
                "prefill_ms": run["prefill"]["ms"], "prefill_tokens_per_s": run["prefill"]["tokens_per_s"],
                "build_s": run["build_s"],
            }
            hf = (peer or {}).get((o["devices"], o["comm"], o["prompt_len"], o["batch"]))
            if hf:
                row |= {"hf_tokens_per_s": hf["tokens_per_s"], "hf_same_tokens": hf["tokens"] == d["greedy_tokens"]}
        rows.append(row)
    _add_ideal(rows)
    return rows


def _setup(row: dict, comm: str | None = None) -> str:
    """The --comm asked for (or `comm`), and the split where one was chosen."""
    comm = comm or row["comm"]
    return f"{comm}, {row['split']} split" if row["split"] else comm


def _series_label(rows: list[dict]) -> str:
    """A series' name in a legend: its variant, with `auto` followed by the backends it chose, which are what ran."""
    r = rows[0]
    ran = "/".join(sorted({x["backend"] for x in rows}))
    return f"{r['quant']}, {_setup(r, f'auto: {ran}' if r['comm'] == 'auto' else None)}"


def _rank_axis(rows: list[dict]) -> str:
    """The x axis of a plot over ranks, naming their kind where every device set given is of one."""
    kinds = {d.kind for r in rows if not is_auto(r["devices"]) for d in parse_devices(r["devices"])}
    return {frozenset({"cuda"}): "ranks (GPUs)", frozenset({"cpu"}): "cpu ranks"}.get(frozenset(kinds), "ranks")


def _variant(row: dict) -> str:
    """What a series of the plots compares: the quantization and the setup."""
    return f"{row['quant']}, {_setup(row)}"


def _add_ideal(rows: list[dict]) -> None:
    """ideal = the fewest-rank run of the same variant, batch and prompt length, scaled linearly in ranks."""
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        peers = [p for p in ok if (_variant(p), p["dtype"], p["batch"], p["prompt_len"]) ==
                 (_variant(r), r["dtype"], r["batch"], r["prompt_len"])]
        base = min(peers, key=lambda p: (p["ranks"], -p["tokens_per_s"]))
        r["ideal_tokens_per_s"] = base["tokens_per_s"] * r["ranks"] / base["ranks"]
        r["scaling_efficiency"] = r["tokens_per_s"] / r["ideal_tokens_per_s"]


def write_report(out_dir: str | Path, sweep: dict, meta: dict, peer: dict | None = None) -> list[Path]:
    """Write every file into `out_dir` (created if needed); returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = build_rows(sweep, peer)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": sweep["runs"]}, indent=2))
    (out / "summary.md").write_text(summary_markdown(rows, sweep, meta))
    _plots(out, rows, sweep)
    return [out / n for n in ("results.csv", "results.json", "summary.md", *PLOTS)]


def _fmt(x, digits=1, pct=False) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    return f"{100 * x:.{digits}f}%" if pct else f"{x:.{digits}f}"


def _unfinished(rows: list[dict], meta: dict) -> str:
    planned = meta.get("configurations", len(rows))
    return f" (in progress or cut short: {planned - len(rows)} more planned)" if planned > len(rows) else ""


def summary_markdown(rows: list[dict], sweep: dict, meta: dict) -> str:
    ok = [r for r in rows if r["status"] == "ok"]
    quants = list(dict.fromkeys(r["quant"] for r in rows))
    kv = ", fp8 KV cache" if meta.get("kv_dtype") == "fp8" else ""
    lines = [f"# raytp bench: {meta['model']}, {meta['dtype']}{kv}, quantization {', '.join(quants)}", "",
             f"`{meta['command']}`", "",
             f"{meta['date']}; {meta['cluster']}; torch {meta['torch']}, ray {meta['ray']}. "
             f"{len(ok)} of {len(rows)} configurations ran{_unfinished(rows, meta)}; "
             f"{meta['decode_tokens']} decode tokens per request, "
             f"{meta['repeats']} timed repeat(s) after a warm-up.", "",
             "## Decode and prefill", ""]
    hf = any(r["hf_tokens_per_s"] is not None for r in rows)
    head = ["devices", "ranks", "nodes", "quant", "backend", "split", "prompt", "batch", "ms/token", "tokens/s",
            "of ideal", "roofline tokens/s", "of roofline", "compute ms", "all-reduce ms", "overhead ms",
            "prefill tokens/s"]
    drafting = any(r["speculate"] not in (None, "off") for r in ok)
    if drafting:
        head += ["drafting", "tokens/step", "acceptance", "per position"]
    if hf:
        head += ["HF tokens/s", "HF same tokens"]
    if any(str(r["speculate"]).startswith(f"{ORACLE}:") for r in ok):
        lines += [f"Drafting `{ORACLE}:RATE` is the benchmark drafter: the target's own tokens, each right with "
                  "probability RATE (see the notes below); it measures speculation's gain at that acceptance, not a "
                  "real drafter's.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ok:
        cells = [f"`{r['devices']}`", str(r["ranks"]), str(r["nodes"]), r["quant"], r["backend"], r["split"] or "-",
                 str(r["prompt_len"]),
                 str(r["batch"]), _fmt(r["ms_per_token"], 2), _fmt(r["tokens_per_s"]),
                 _fmt(r["scaling_efficiency"], 0, pct=True), _fmt(r["roofline_tokens_per_s"]),
                 _fmt(r["roofline_fraction"], 1, pct=True), _fmt(r["compute_ms"], 2), _fmt(r["allreduce_ms"], 2),
                 _fmt(r["overhead_ms"], 2), _fmt(r["prefill_tokens_per_s"])]
        if drafting:
            cells += [f"`{r['speculate']}`", _fmt(r["tokens_per_step"], 2), _fmt(r["acceptance"], 0, pct=True),
                      _fmt(r["position_acceptance"], 0, pct=True)]
        if hf:
            cells += [_fmt(r["hf_tokens_per_s"]), _fmt(r["hf_same_tokens"])]
        lines.append("| " + " | ".join(cells) + " |")
    if len(quants) > 1:
        lines += ["", "## Quantizations side by side (decode tokens/s)", ""] + _quant_table(ok)
    not_run = [r for r in rows if r["status"] != "ok"]
    if not_run:
        lines += ["", "## Skipped and failed", ""]
        seen = set()
        for r in not_run:
            key = (r["devices"], _variant(r), r["prompt_len"], r["reason"])
            if key not in seen:  # one line per group, not per batch size
                seen.add(key)
                lines.append(f"- `{r['devices']}` quant {r['quant']}, --comm {r['comm']}, prompt {r['prompt_len']}: "
                             f"**{r['status']}**: {r['reason']}")
    if sweep["runs"]:
        lines += ["", "## How each group split the model", ""] + _pieces_table(sweep)
    if any("profile" in d for run in sweep["runs"] for d in run["decode"]):
        lines += ["", "## Decode step profile (torch.profiler, per rank; ms per step and share)", ""]
        lines += _profile_table(sweep)
    lines += ["", "## All-reduce latency (us, slowest rank)", ""] + _allreduce_table(sweep)
    lines += ["", "## Every backend's all-reduce latency (us per call in a CUDA graph, slowest rank)", ""]
    lines += _backends_table(sweep)
    lines += ["", "## How the figures are obtained", "", NOTES]
    if meta.get("peer_note"):
        lines += [f"- **HF peer**: {meta['peer_note']}", ""]
    lines += ["## Plots", ""] + [f"![{n[:-4]}]({n})" for n in PLOTS] + [""]
    return "\n".join(lines)


def _quant_table(ok: list[dict]) -> list[str]:
    """Per (device set, setup, prompt, batch): each quantization's tokens/s, and each one's ratio to the base (the
    unquantized run, else the sweep's first quantization) beside how many times fewer bytes its step reads."""
    quants = list(dict.fromkeys(r["quant"] for r in ok))
    base = NO_QUANT if NO_QUANT in quants else quants[0]
    others = [q for q in quants if q != base]
    cells: dict[tuple, dict[str, dict]] = {}
    for r in sorted(ok, key=lambda r: r["ranks"]):
        cells.setdefault((r["devices"], r["ranks"], _setup(r), r["prompt_len"], r["batch"]), {})[r["quant"]] = r

    def ratio(by: dict, q: str) -> str:
        if q not in by or base not in by:
            return "-"
        return (f"{by[q]['tokens_per_s'] / by[base]['tokens_per_s']:.2f}x ("
                f"{by[base]['read_bytes_per_step'] / by[q]['read_bytes_per_step']:.2f}x fewer bytes read)")

    head = ["devices", "ranks", "backend", "prompt", "batch", *(f"{q} tokens/s" for q in quants),
            *(f"{q} / {base}" for q in others)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (spec, ranks, setup, prompt, batch), by in cells.items():
        row = [f"`{spec}`", str(ranks), setup, str(prompt), str(batch),
               *(_fmt(by[q]["tokens_per_s"]) if q in by else "-" for q in quants), *(ratio(by, q) for q in others)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _pieces_table(sweep: dict) -> list[str]:
    """Every rank's range of every piece the model declared (ShardPlan.to_dict) and the state each kind of layer
    keeps there (KV cache, window cache, a recurrent state), once per device set, quantization and split."""
    plans = {(",".join(run["devices"]), run["plan"]["quant"], run["plan"]["split"]): run["plan"]
             for run in sweep["runs"]}
    first = next(iter(plans.values()))
    spans = [s for p in first["pieces"] for s in (*p["spans"][1:], p["spans"][0])]
    blocks = ", ".join(f"{p['spans'][0]['title']} in blocks of {p['block']}" for p in first["pieces"])
    states = list(first["ranks"][0].get("state_bytes", {}))  # results from before plans named their states: none
    head = ["devices", "quant", "split", "rank", "device"] + [s["title"] for s in spans] + states
    lines = [f"Split: {blocks}; a cell is the rank's count [start:stop), then its state for the batch the group "
             "was planned for.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (devices, quant, split), plan in plans.items():
        for r in plan["ranks"]:
            cells = [f"`{devices}`", quant or "none", split, str(r["rank"]), f"`{r['device']}`"]
            cells += [f"{r[s['name']]} [{r[s['name'] + '_range'][0]}:{r[s['name'] + '_range'][1]}]" for s in spans]
            cells += [format_bytes(r["state_bytes"][name]) for name in states]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _profile_table(sweep: dict) -> list[str]:
    """One row per rank of every profiled (run, batch): its mean step and each class's ms and share of it."""
    head = ["devices", "quant", "backend", "prompt", "batch", "rank", "device", "decode", "timed ms/step", "step ms",
            *(LABELS[c] for c in CLASSES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in sweep["runs"]:
        for d in run["decode"]:
            for rank, p in enumerate(d.get("profile", [])):
                decode = p["decode"] + (" (no kernel traced)" if p["kernels_unseen"] else "")
                cells = [f"`{run['spec']}`", run["quant"], run["backend"], str(run["prompt_len"]), str(d["batch"]),
                         str(rank),
                         f"{run['devices'][rank]} ({run['ranks'][rank]['device_name']})", decode,
                         _fmt(d["ms_per_step"], 2), _fmt(p["step_ms"], 2),
                         *(f"{p[f'{c}_ms']:.2f} ({100 * p[f'{c}_share']:.0f}%)" for c in CLASSES)]
                lines.append("| " + " | ".join(cells) + " |")
    return lines


def _allreduce_series(sweep: dict) -> dict[tuple[str, int, str, str], dict[int, float]]:
    """(backend, ranks, devices, dtype) -> {elements: us}, from the first group measured of each."""
    series = {}
    for run in sweep["runs"]:
        key = (run["backend"], len(run["devices"]), run["spec"], run["dtype"])
        if key not in series:
            series[key] = {int(n): v["slowest_rank"] for n, v in run["allreduce_us"]["by_size"].items()}
    return series


def _allreduce_table(sweep: dict) -> list[str]:
    series = _allreduce_series(sweep)
    if not series:
        return ["(no run)"]
    sizes = sorted({n for s in series.values() for n in s})
    lines = ["| backend | ranks | devices | " + " | ".join(f"{n} el." for n in sizes) + " |",
             "|" + "---|" * (3 + len(sizes))]
    for (backend, ranks, spec, _), s in series.items():
        lines.append(f"| {backend} | {ranks} | `{spec}` | " + " | ".join(_fmt(s.get(n)) for n in sizes) + " |")
    return lines


def _backends_table(sweep: dict) -> list[str]:
    """Each group's start-up timing of every backend that could run on it (one node of several GPUs only)."""
    rows = [(run["spec"], run["quant"], run["comm"], name, us) for run in sweep["runs"]
            for name, us in run.get("backend_us", {}).items()]
    if not rows:
        return ["(no group of several GPUs on one node)"]
    sizes = sorted({int(n) for *_, us in rows for n in us})
    lines = ["| devices | quant | group's --comm | backend | " + " | ".join(f"{n} el." for n in sizes) + " |",
             "|" + "---|" * (4 + len(sizes))]
    for spec, quant, comm, name, us in rows:
        lines.append(f"| `{spec}` | {quant} | {comm} | {name} | " + " | ".join(_fmt(us.get(str(n))) for n in sizes)
                     + " |")
    return lines


# ---- plots ---------------------------------------------------------------------------------------------------


def _plots(out: Path, rows: list[dict], sweep: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    try:
        _plot_scaling(plt, out / "scaling.png", ok)
        _plot_breakdown(plt, out / "breakdown.png", ok)
        _plot_allreduce(plt, out / "allreduce.png", sweep)
        _plot_prefill(plt, out / "prefill.png", ok)
    finally:
        plt.close("all")


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what}: every configuration was skipped or failed", ha="center", va="center",
            transform=ax.transAxes)
    ax.set_axis_off()


def _series(rows: list[dict], key) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(key(r), []).append(r)
    return {k: sorted(v, key=lambda r: (r["ranks"], r["devices"])) for k, v in out.items()}


def _plot_scaling(plt, path: Path, ok: list[dict]) -> None:
    """One panel per (prompt length, batch); per (quantization, backend): measured, ideal linear, roofline."""
    panels = _series(ok, lambda r: (r["prompt_len"], r["batch"]))
    prompts = sorted({p for p, _ in panels}) or [0]
    batches = sorted({b for _, b in panels}) or [0]
    fig, axes = plt.subplots(len(prompts), len(batches), figsize=(5 * len(batches), 3.8 * len(prompts)),
                             squeeze=False)
    if not ok:
        _empty(axes[0][0], "decode run")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    variants = sorted({_variant(r) for r in ok})
    for (prompt, batch), rs in panels.items():
        ax = axes[prompts.index(prompt)][batches.index(batch)]
        for i, variant in enumerate(variants):
            mine = [r for r in rs if _variant(r) == variant]
            if not mine:
                continue
            c = colors[i % len(colors)]
            x = [r["ranks"] for r in mine]
            name = _series_label(mine)
            ax.plot(x, [r["tokens_per_s"] for r in mine], "o-", color=c, label=f"{name} measured")
            ax.plot(x, [r["ideal_tokens_per_s"] for r in mine], ":", color=c, label=f"{name} ideal linear")
            ax.plot(x, [r["roofline_tokens_per_s"] for r in mine], "--", color=c, alpha=0.6,
                    label=f"{name} roofline")
            for r in mine:
                if sum(p["ranks"] == r["ranks"] for p in mine) > 1:  # several device sets of one size: name them
                    ax.annotate(r["devices"], (r["ranks"], r["tokens_per_s"]), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
        hf = {r["devices"]: r for r in rs if r["hf_tokens_per_s"] is not None}  # the same for every backend
        if hf:
            ax.plot([r["ranks"] for r in hf.values()], [r["hf_tokens_per_s"] for r in hf.values()], "kx",
                    markersize=9, label="HF transformers, one device")
        ax.set_yscale("log")
        ax.set_xticks(sorted({r["ranks"] for r in rs}))
        ax.set_xlabel(_rank_axis(rs))
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"prompt {prompt}, batch {batch}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_breakdown(plt, path: Path, ok: list[dict]) -> None:
    labels = [f"{r['devices']} {r['quant']} {r['backend']} p{r['prompt_len']} b{r['batch']}" for r in ok]
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.35 * max(len(ok), 1)))
    if not ok:
        _empty(ax, "decode run")
    else:
        y = range(len(ok))
        left = [0.0] * len(ok)
        for key, name in (("compute_ms", "compute (roofline)"), ("allreduce_ms", "all-reduce"),
                          ("overhead_ms", "overhead (the rest)")):
            width = [max(0.0, r[key]) for r in ok]
            ax.barh(list(y), width, left=left, label=name)
            left = [a + b for a, b in zip(left, width)]
        ax.plot([r["ms_per_token"] for r in ok], list(y), "k|", markersize=14, label="measured")
        ax.set_yticks(list(y), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ms per decode step (= ms/token per request)")
        ax.set_title("where a decode step goes (estimated: see summary.md)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)  # beside: on the
        # axes it would cover a bar
        ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_allreduce(plt, path: Path, sweep: dict) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = _allreduce_series(sweep)
    if not series:
        _empty(ax, "all-reduce measurement")
    for (backend, ranks, spec, dtype), s in sorted(series.items()):
        sizes = sorted(s)
        ax.plot([n * DTYPE_BYTES[dtype] for n in sizes], [s[n] for n in sizes], "o-",
                label=f"{backend}, {ranks} ranks ({spec})")
    if series:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("all-reduce latency (us, slowest rank)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax.set_title("all-reduce latency by message size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_prefill(plt, path: Path, ok: list[dict]) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    firsts = {}
    for r in ok:  # prefill is measured once per group: any batch's row carries it
        firsts.setdefault((_variant(r), r["prompt_len"], r["devices"]), r)
    series = _series(list(firsts.values()), lambda r: (_variant(r), r["prompt_len"]))
    if not series:
        _empty(ax, "prefill run")
    for (variant, prompt), rs in sorted(series.items()):
        ax.plot([r["ranks"] for r in rs], [r["prefill_tokens_per_s"] for r in rs], "o-",
                label=f"{_series_label(rs)}, prompt {prompt}")
    if series:
        ax.set_xticks(sorted({r["ranks"] for r in firsts.values()}))
        ax.set_yscale("log")
        ax.set_xlabel(_rank_axis(ok))
        ax.set_ylabel("prefill tokens/s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax.set_title("prefill throughput (one request)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
