"""`raytp bench`: a sweep over device sets, backends, quantizations, batches and prompt lengths; tables, a report
and plots (raytp.bench)."""

from __future__ import annotations

import sys
from pathlib import Path

from raytp.cli.common import SPLITS, UserError, resolve_devices
from raytp.cli.session import ray_session
from raytp.parallel.devices import is_auto, parse_devices


def _int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UserError(f"{what} must be comma-separated positive integers, got {text!r}")
    return values


def _comm_list(text: str) -> list[str]:
    from raytp.actors.group import COMM_BACKENDS

    comms = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in comms if c not in COMM_BACKENDS]
    if not comms or bad:
        raise UserError(f"--comm takes comma-separated backends of {', '.join(COMM_BACKENDS)}; got {text!r}")
    return list(dict.fromkeys(comms))


def _bench_command(args, specs: list[str]) -> str:
    """The command line that reproduces this sweep (for summary.md)."""
    import shlex

    from raytp.runtime.speculation import speculate_option

    parts = ["raytp", "bench", "--model", args.model, "--devices-sweep" if len(specs) > 1 else "--devices",
             ";".join(specs), "--comm", args.comm, "--dtype", args.dtype, "--kv-dtype", args.kv_dtype, "--batch",
             args.batch, "--prompt-len", args.prompt_len, "--decode-tokens", str(args.decode_tokens), "--repeats",
             str(args.repeats), "--allreduce-sizes", args.allreduce_sizes, "--allreduce-iters",
             str(args.allreduce_iters), *args.options.flags()]
    optional = {"--quant": args.quant, "--split": args.split, "--out": args.out,
                "--speculate": speculate_option(args.draft_model, args.speculate) if args.speculate != "off" else None}
    parts += [x for flag, value in optional.items() if value for x in (flag, value)]
    switches = [flag for flag, on in (("--share-gpus", args.share_gpus), ("--no-p2p", args.no_p2p),
                                      ("--hf-peer", args.hf_peer), ("--profile-traces", args.profile_traces)) if on]
    profiled = ["--profile", str(args.profile)] if args.profile else []
    return shlex.join(parts + profiled + switches)


def cmd_bench(args) -> None:
    import datetime
    import platform

    import ray
    import torch
    from tqdm import tqdm

    from raytp.bench.sweep import Sweep, cluster_line, format_results, run_sweep
    from raytp.bench.report import write_report
    from raytp.weights.source import ModelSource

    if args.hf_peer:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UserError("--hf-peer needs transformers: pip install transformers") from None
        from raytp.bench.hf_peer import peer_rows
    batches = _int_list(args.batch, "--batch")
    prompt_lens = _int_list(args.prompt_len, "--prompt-len")
    sizes = _int_list(args.allreduce_sizes, "--allreduce-sizes")
    comms = _comm_list(args.comm)
    splits = [x.strip() for x in (args.split or "").split(",") if x.strip()] or [None]
    if any(x not in SPLITS for x in splits if x):
        raise UserError(f"--split takes comma-separated splits of {', '.join(SPLITS)}; got {args.split!r}")
    if args.devices_sweep is not None and args.devices != "auto":
        raise UserError("give --devices or --devices-sweep, not both")
    specs = [s.strip() for s in (args.devices_sweep or args.devices).split(";") if s.strip()]
    if not specs:
        raise UserError(f"--devices-sweep has no device SPEC: {args.devices_sweep!r}")
    for spec in specs:  # a typo fails now, not after the configurations before it ran
        if not is_auto(spec):
            parse_devices(spec)
    config = ModelSource.parse(args.models[0]).config()  # checked before Ray by checks.check_args
    widest = max(specs, key=lambda s: 1 if is_auto(s) else sum(d.kind == "cpu" for d in parse_devices(s)))
    with ray_session(args.address, widest):
        sweep = Sweep(models=tuple(args.models), device_sets=tuple((s, resolve_devices(s)) for s in specs),
                      comms=tuple(comms), batches=tuple(batches), prompt_lens=tuple(prompt_lens), dtype=args.dtype,
                      kv_dtype=args.kv_dtype, decode_tokens=args.decode_tokens, repeats=args.repeats,
                      max_context=args.max_context, max_batch=args.max_batch, allreduce_sizes=tuple(sizes),
                      allreduce_iters=args.allreduce_iters, options=args.options,
                      splits=tuple(dict.fromkeys(splits)), share_gpus=args.share_gpus, no_p2p=args.no_p2p,
                      profile_steps=args.profile, speculate=args.speculate, draft_model=args.draft_model,
                      trace_dir=str(Path(args.out) / "traces") if args.profile_traces else None)
        with tqdm(total=sweep.size, desc="raytp bench", unit="config", file=sys.stderr) as bar:
            def on_row(o):
                bar.set_postfix_str(f"{o['devices']} {o['quant']} {o['comm']} p{o['prompt_len']} b{o['batch']}: "
                                    f"{o['status']}")
                bar.update()
                if o["status"] != "ok" and o["batch"] == batches[0]:
                    tqdm.write(f"raytp: {o['status']} {o['devices']} quant {o['quant']} --comm {o['comm']} "
                               f"--prompt-len {o['prompt_len']}: {o['reason']}", file=sys.stderr)

            def meta(runs: list[dict], peer_note: str = "") -> dict:
                return {"command": _bench_command(args, specs), "model": args.model, "dtype": args.dtype,
                        "kv_dtype": args.kv_dtype,
                        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                        "cluster": cluster_line(runs), "host": platform.node(), "torch": torch.__version__,
                        "ray": ray.__version__, "decode_tokens": args.decode_tokens, "repeats": args.repeats,
                        "peer_note": peer_note, "configurations": sweep.size}

            def on_config(so_far: dict) -> None:  # a sweep cut short keeps every configuration it finished
                if args.out:
                    write_report(args.out, so_far, meta(so_far["runs"]))

            result = run_sweep(sweep, on_row=on_row, on_config=on_config,
                               on_run=lambda res: tqdm.write(format_results(res) + "\n", file=sys.stdout))
        peer, peer_note = peer_rows(sweep, result, config) if args.hf_peer else ({}, "")
        final_meta = meta(result["runs"], peer_note)
    failed = [o for o in result["outcomes"] if o["status"] != "ok"]
    if args.out:
        paths = write_report(args.out, result, final_meta, peer)
        print(f"raytp: wrote {', '.join(p.name for p in paths)} to {args.out}", file=sys.stderr)
    broken = [o for o in failed if o["status"] == "failed"]
    if broken:
        first = broken[0]
        raise UserError(f"{len(broken)} of {sweep.size} configurations failed; the first: {first['devices']} quant "
                        f"{first['quant']} --comm {first['comm']}: {first['reason']}")
