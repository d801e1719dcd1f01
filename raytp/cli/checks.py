"""Every argument checked before Ray starts: a mistake costs a second, not a cluster start-up and a model load.

Cheapest first: the sampling and model checks import torch, the model check may download smollm2."""

from __future__ import annotations

import os

from raytp.cli.common import CPU_RANKS_PER_CORE, UserError, plural
from raytp.cli.prompt import check_prompt, prompt_ids
from raytp.cli.sampling import model_defaults, sampling_params
from raytp.cli.serving_checks import check_serve_args
from raytp.model.config import NO_QUANT, QUANT_PRESETS
from raytp.parallel.devices import format_bytes, is_auto, parse_devices
from raytp.weights.generation_defaults import SamplingDefaults


def check_args(args) -> None:
    """Refuse the first bad argument of `args` with a UserError; fills in what the checks derive (args.models for
    bench, args.model with --quant's suffix, args.api_key from --api-key-file, args.sampling_defaults, and for
    generate args.prompt_ids)."""
    if not hasattr(args, "devices"):  # `pull`
        return
    if hasattr(args, "speculate"):
        _split_speculate(args)
    if args.command == "serve":
        check_serve_args(args)
    _check_sizes(args)
    if args.command == "generate" and args.prompt_ids is None and not args.prompt:
        raise UserError("--prompt is empty: give the text to continue (or --chat to send it as a chat message)")
    if args.kv_dtype == "fp8" and args.command != "plan":  # `plan` only counts bytes; the ranks need float8
        _check_fp8_cache()
    if args.command == "bench":
        _check_bench(args)
    _check_device_specs(args)
    if hasattr(args, "temperature"):
        _check_sampling(args)
    elif hasattr(args, "speculate"):
        _check_speculate(args.speculate)
    _check_models(args)
    if getattr(args, "draft_model", None) is not None:
        _check_draft_model(args)
    if hasattr(args, "speculate"):
        _check_mtp(args)
    if args.command in ("generate", "chat", "serve"):
        config = _model_config(args.model)
        args.sampling_defaults = model_defaults(args.model)
        _check_speculation_fits(args, config)
        if hasattr(args, "top_k"):
            _check_top_k(sampling_params(args, args.sampling_defaults).top_k, config.vocab_size)
        if args.command == "generate":
            args.prompt_ids = prompt_ids(args)
            check_prompt(args.prompt_ids, sampling_params(args, args.sampling_defaults), config, args)
        _check_plan_fits(args, config)
    if getattr(args, "hf_peer", False):
        _check_hf_peer(args.models)


def _check_sizes(args) -> None:
    if args.max_context < 1:
        raise UserError(f"--max-context must be >= 1, got {args.max_context}")
    if hasattr(args, "rank_timeout") and not 0 < args.rank_timeout < float("inf"):
        raise UserError(f"--rank-timeout must be a number of seconds > 0, got {args.rank_timeout}")
    if args.max_batch < (0 if args.command == "bench" else 1):  # bench: 0 sizes the cache for each batch it runs
        raise UserError(f"--max-batch must be >= {0 if args.command == 'bench' else 1}, got {args.max_batch}")


def _check_bench(args) -> None:
    if args.decode_tokens < 4:
        raise UserError(f"--decode-tokens must be at least 4 to time whole-batch steps, got {args.decode_tokens}")
    if args.profile < 0:
        raise UserError(f"--profile takes a number of steps (0: none), got {args.profile}")
    if args.profile_traces and not (args.profile and args.out):
        raise UserError("--profile-traces saves the traces of --profile into --out: give --profile and --out DIR")


def _check_device_specs(args) -> None:
    specs = [s.strip() for s in (getattr(args, "devices_sweep", None) or args.devices).split(";") if s.strip()]
    for spec in specs:
        if not is_auto(spec):
            parse_devices(spec)
            if args.command != "plan" and not args.address:
                _check_devices_fit_here(spec)


def _check_sampling(args) -> None:
    if args.max_tokens is not None and args.max_tokens >= args.max_context:
        raise UserError(f"--max-tokens {args.max_tokens} does not fit in --max-context {args.max_context}, "
                        "which also holds the prompt; lower --max-tokens or raise --max-context")
    try:
        sampling_params(args, SamplingDefaults())  # the rules live in SamplingParams alone; its message names the
        # value (the model's own defaults are checked once the model is)
    except ValueError as e:
        raise UserError(str(e)) from None


def _check_speculate(spec: str) -> None:
    from raytp.runtime.speculation import drafted_tokens

    try:
        drafted_tokens(spec)
    except ValueError as e:
        raise UserError(f"--{e}") from None


def _split_speculate(args) -> None:
    """`--speculate draft:PATH[:K]` -> args.draft_model (PATH) and args.speculate ("draft[:K]", every request's);
    any other value: args.draft_model None. The benchmark drafter (oracle) is refused but by bench."""
    from raytp.runtime.speculation import draft_model_option, refuse_benchmark_drafter

    try:
        args.draft_model, args.speculate = draft_model_option(args.speculate)
        if args.command != "bench":
            refuse_benchmark_drafter(args.speculate)
    except ValueError as e:
        raise UserError(f"--{e}" if getattr(e, "param", None) else str(e)) from None


def _check_draft_model(args) -> None:
    """The draft model loads (as --model is checked), shares the model's vocabulary, and can drop a rejected
    draft's positions from its own state."""
    from raytp.runtime.speculation import draft_unsupported_reason, speculate_option

    flag = f"--speculate {speculate_option(args.draft_model, args.speculate)}"
    try:
        _check_model(args.draft_model)
    except UserError as e:
        raise UserError(f"{flag}: {e}") from None
    draft = _model_config(args.draft_model)
    for model in getattr(args, "models", [args.model]):
        size = _model_config(model).vocab_size
        if draft.vocab_size != size:
            raise UserError(f"{flag}: the draft model's vocabulary has {draft.vocab_size} tokens, {model}'s {size}; "
                            "a draft model must share the model's tokenizer")
    if why := draft_unsupported_reason(draft):
        raise UserError(f"{flag}: {why.replace('the model', 'the draft model', 1)}; choose another draft model")


def _check_speculation_fits(args, config) -> None:
    from raytp.runtime.speculation import OFF, unsupported_reason

    if getattr(args, "speculate", OFF) != OFF and (why := unsupported_reason(config)):
        raise UserError(f"--speculate {args.speculate}: {why}; leave --speculate out")


def _check_mtp(args) -> None:
    """`--speculate mtp[:K]` needs MTP layers in every model it runs (their tensors stored, not only counted)."""
    from raytp.runtime.speculation import no_mtp_reason

    for model in getattr(args, "models", [args.model]):
        if why := no_mtp_reason(args.speculate, _model_config(model).mtp_layers):
            raise UserError(f"--speculate {args.speculate}: {why.replace('the model', model, 1)}")


def _check_models(args) -> None:
    if args.command == "bench":
        args.models = bench_models(args.model, args.quant)
    elif args.quant:
        args.model = _quantized(args.model, args.quant, args.quant)
    for model in getattr(args, "models", [args.model]):
        _check_model(model)


def _check_model(model: str) -> None:
    """Refuse a --model that cannot be loaded before Ray starts (config, tokenizer, safetensors headers, every
    tensor's shape; no weights read); `smollm2` is pulled here, with a progress bar the user sees, before any
    actor needs it."""
    from raytp.weights.source import ModelSource

    try:
        ModelSource.parse(model).check()
    except ValueError as e:
        raise UserError(str(e)) from None


def _check_fp8_cache() -> None:
    """Refuse --kv-dtype fp8 where this torch has no float8 (the ranks check their own torch too)."""
    from raytp.kernels import kv_fp8

    try:
        kv_fp8.check_supported()
    except ValueError as e:
        raise UserError(str(e)) from None


def _check_devices_fit_here(spec: str) -> None:
    """Refuse a device spec this machine cannot host, for a local Ray (a joined cluster may have more)."""
    devices = parse_devices(spec)
    cpus = [d for d in devices if d.kind == "cpu"]
    cores = os.cpu_count() or 1
    if len(cpus) > CPU_RANKS_PER_CORE * cores:
        raise UserError(f"--devices {spec!r} asks for {len(cpus)} cpu ranks; this machine has {cores} CPU cores and "
                        f"a local Ray runs at most {CPU_RANKS_PER_CORE} ranks per core ({CPU_RANKS_PER_CORE * cores}); "
                        "use fewer cpu ranks, or --address to join a cluster with more")
    gpus = [d for d in devices if d.kind == "cuda"]
    if gpus and _local_gpu_count() == 0:
        raise UserError(f"--devices {spec!r} asks for {plural(len(gpus), 'cuda rank')}; this machine has no GPU "
                        f"(torch sees none); use cpu ranks, e.g. --devices cpu*{len(gpus)}, or --address to join a "
                        "cluster with GPUs")
    capped = sum(d.mem_bytes for d in cpus if d.mem_bytes is not None)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if capped > total:
        raise UserError(f"--devices {spec!r} gives its cpu ranks {format_bytes(capped)} in all, this machine has "
                        f"{format_bytes(total)} of memory; lower the @MEM caps")


def _local_gpu_count() -> int:
    """The GPUs a local Ray would find (both honour CUDA_VISIBLE_DEVICES); more cuda ranks than GPUs share them."""
    import torch

    return torch.cuda.device_count()


def _model_config(model: str):
    from raytp.weights.source import ModelSource

    return ModelSource.parse(model).config()


def _check_top_k(top_k: int, vocab_size: int) -> None:
    from raytp.runtime.requests import check_sampling
    from raytp.runtime.sampling import SamplingParams

    try:
        check_sampling(SamplingParams(top_k=top_k), vocab_size)
    except ValueError as e:
        raise UserError(f"--top-k: {e}") from None


def _check_plan_fits(args, config) -> None:
    """Refuse devices that cannot hold the model, as `raytp plan` would, where every rank's budget is known before
    Ray starts: each @MEM cap (an upper bound on a GPU, whose rank plans with at most that), and a local Ray's cpu
    ranks without one sharing this machine's free memory. The ranks plan again with what they measure."""
    import psutil

    from raytp.model.pieces import plan_model, plan_with_draft
    from raytp.parallel.plan import PlanError

    if is_auto(args.devices):
        return
    devices = parse_devices(args.devices)
    uncapped_cpus = sum(d.kind == "cpu" and d.mem_bytes is None for d in devices)
    budgets = []
    for d in devices:
        if d.mem_bytes is not None:
            budgets.append((str(d), d.mem_bytes))
        elif d.kind == "cpu" and not args.address:
            budgets.append((str(d), psutil.virtual_memory().available // uncapped_cpus))
        else:
            return  # a GPU's free memory, or a joined cluster's: only the ranks can tell
    bandwidths = [d.bandwidth for d in devices] if all(d.bandwidth for d in devices) else None
    shape = dict(max_context=args.max_context, max_batch=args.max_batch, dtype=args.dtype, bandwidths=bandwidths,
                 split=args.split if bandwidths else "memory", kv_dtype=args.kv_dtype)
    try:
        if args.draft_model is None:
            plan_model(config, budgets, **shape)
        else:
            plan_with_draft(config, _model_config(args.draft_model), budgets, **shape)
    except PlanError as e:
        raise UserError(str(e)) from None


def _check_hf_peer(models: list[str]) -> None:
    from raytp.weights.source import ModelSource

    for model in models:
        source = ModelSource.parse(model)
        config = source.config()
        if config.quant is not None:
            raise UserError(f"--hf-peer runs transformers on dense weights; {model!r} is quantized "
                            f"({config.quant.describe()})")
        if config.moe is not None and source.is_synthetic:  # transformers 5 holds experts fused, under other
            # names than a checkpoint's: only its own loader converts them
            raise UserError(f"--hf-peer loads a mixture of experts through transformers' from_pretrained; "
                            f"{model!r} is synthetic: give a model directory, or leave out --hf-peer")


def _quantized(model: str, quant: str, given: str) -> str:
    """The spec that carries --quant `quant` to every rank: `model`@`quant` (for none, `model` itself); `given` is
    the --quant text, for the message."""
    if not model.startswith("synthetic:") or "@" in model:
        raise UserError(f"--quant {given} applies to a synthetic model without an @ suffix, not {model!r}; a "
                        "checkpoint's quantization comes from its config.json")
    return model if quant == NO_QUANT else f"{model}@{quant}"


def bench_models(model: str, text: str | None) -> list[str]:
    """`raytp bench --quant a,b,...`: the model spec of each quantization, in order; without --quant, `model` alone."""
    if text is None:
        return [model]
    choices = (NO_QUANT, *QUANT_PRESETS)
    quants = [q.strip() for q in text.split(",") if q.strip()]
    bad = [q for q in quants if q not in choices]
    if bad or not quants:
        what = f"unknown quantization {bad[0]!r}" if bad else "no quantization"
        raise UserError(f"--quant {text!r}: {what}; give comma-separated quantizations of {', '.join(choices)}")
    return [_quantized(model, q, text) for q in dict.fromkeys(quants)]
