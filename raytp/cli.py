"""The `raytp` command: pull, plan, generate, chat (and serve, bench).

Every argument is checked before Ray starts (`_check_args`). Every command that runs a model then joins a
running Ray cluster (`--address` or RAY_ADDRESS, as its owner configured it) or starts a local one that listens
on 127.0.0.1 only with Ray's token authentication, and shuts it down on exit. Errors caused by the input (a bad
device spec, a model that does not fit, a prompt longer than the context...) print one line naming the value and
the fix, never a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from raytp.model.config import NO_QUANT, QUANT_PRESETS
from raytp.parallel.devices import DeviceSpecError, format_bytes, is_auto, parse_devices
from raytp.parallel.plan import KV_DTYPES
from raytp.weights.smollm2_quantized import SCHEMES as PULL_SCHEMES

DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MAX_TOKENS = 256
SPLITS = ("memory", "speed")
EPILOG = """device SPEC: comma-separated KIND[:INDEX][@MEM] or KIND*N[@MEM], KIND cpu or cuda, e.g.
  cpu@3GiB,cpu@2GiB,cpu@1GiB   three CPU ranks with uneven budgets
  cuda*4                       four GPUs at their free memory
  cuda:0@24GiB,cuda:1@80GiB    two GPUs capped (emulates mismatched cards)
  auto                         every GPU the Ray cluster has (one CPU rank if none)
model: smollm2 (the embedded SmolLM2-135M-Instruct, pulled on first use) or a Hugging Face directory
  synthetic:llama-3.1-70b      random weights of a published config's shapes (also -8b, -405b, tiny);
                               synthetic:llama-3.1-70b@w4a16 (or --quant w4a16) quantizes them"""


CPU_RANKS_PER_CORE = 4  # a local Ray refuses more cpu ranks than this per core: each rank spins in its collectives
TOKEN_FILE = "ray-auth-token"  # under $RAYTP_HOME: the token of every local Ray that raytp starts
# Ray prints this for every worker that dies, with a page of advice; raytp names the rank or driver itself
RAY_WORKER_DIED = "A worker died or was killed"


class UserError(Exception):
    """Printed as one line; exit status 2."""


class DriverDied(Exception):
    """The driver actor is gone while serving; printed as one line, exit status 1."""


def _model_args(p: argparse.ArgumentParser, max_batch: int, sweep: bool = False) -> None:
    """The model and its placement; with `sweep` (bench), --quant and --split take comma-separated lists to compare."""
    p.add_argument("--model", default="smollm2", help="smollm2 or a Hugging Face model directory (default: smollm2)")
    p.add_argument("--devices", default="auto", help="device SPEC, see below (default: auto)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="weights and activations (default: bfloat16)")
    p.add_argument("--kv-dtype", default="auto", choices=KV_DTYPES,
                   help="KV cache storage: auto is the --dtype; fp8 stores float8 e4m3 values with a float32 scale "
                        "per token and KV head, 1 + 4/head_dim bytes per element instead of 2 in bfloat16, so about "
                        "twice the --max-context or --max-batch fits; the cost is accuracy: every cached key and value "
                        "rounds to 3 mantissa bits (within 1/16 of itself), so logits move slightly and greedy text "
                        "can change (default: auto)")
    if sweep:
        p.add_argument("--quant", default=None, metavar="QUANT,...",
                       help=f"comma-separated weight quantizations of a synthetic model to compare, of {NO_QUANT} "
                            f"(every weight in --dtype) and {', '.join(QUANT_PRESETS)} (its attention and MLP weights "
                            "quantized, as --model synthetic:NAME@QUANT); each device set runs each quantization, "
                            "and every table and plot shows each (quantization, backend) as its own series, e.g. "
                            f"--quant {NO_QUANT},w4a16 (default: the model as given)")
    else:
        p.add_argument("--quant", default=None, choices=tuple(QUANT_PRESETS),
                       help="quantize a synthetic model's attention and MLP weights (same as --model "
                            "synthetic:NAME@QUANT)")
    p.add_argument("--max-context", type=int, default=2048, help="tokens per sequence, prompt included (default: 2048)")
    p.add_argument("--max-batch", type=int, default=max_batch, help=f"concurrent sequences (default: {max_batch})")
    if sweep:
        p.add_argument("--split", default=None, help="comma-separated splits to compare, of memory and speed "
                       "(default: each configuration's own default)")
    else:
        p.add_argument("--split", choices=SPLITS, default=None,
                       help="shares in proportion to each device's memory, or the shares that make the slowest "
                            "rank's weight reads fastest within every device's memory (default: speed when every "
                            "device's bandwidth is known: given as ~RATE in --devices or measured on GPUs; else "
                            "memory)")


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--comm", default="auto", choices=("auto", "hoststaged", "gloo", "nccl", "p2p"),
                   help="all-reduce backend; auto logs what it chose and why (default: auto)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (default: $RAY_ADDRESS, else start a local one)")
    p.add_argument("--rank-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="a rank that answers no heartbeat for this long is taken as stopped or stuck: its requests "
                        "fail and the group is rebuilt, instead of every rank waiting on it (default: 5)")
    _option_args(p)


def _option_args(p: argparse.ArgumentParser) -> None:
    """The run-time switches of every command that runs a model, collected in `args.options` (a RuntimeOptions);
    each flag's default comes from its RAYTP_* variable (raytp.runtime.options)."""
    from dataclasses import fields, replace

    from raytp.runtime.options import FLAGS, RuntimeOptions, env_name

    class Switch(argparse.Action):
        def __init__(self, option_strings, dest, value, **kw):
            super().__init__(option_strings, dest="options", nargs=0, **kw)
            self.field, self.value = dest, value

        def __call__(self, parser, namespace, values, option_string=None):
            namespace.options = replace(namespace.options, **{self.field: self.value})

    names = ", ".join(env_name(f.name) for f in fields(RuntimeOptions))
    g = p.add_argument_group(f"run-time options (defaults from {names})")
    for f in fields(RuntimeOptions):
        flag, why = FLAGS[f.name]
        g.add_argument(flag, action=Switch, dest=f.name, value=not f.default, help=why)
    p.set_defaults(options=RuntimeOptions.from_env())  # after the flags: it also becomes their default


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"tokens to generate at most (default: {DEFAULT_MAX_TOKENS}, or half of --max-context if less)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default: 0.7)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1, off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default: 0, off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="(default: 1, off)")
    p.add_argument("--seed", type=int, default=0, help="fixes the random draws (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raytp", description="Tensor-parallel LLM inference over mismatched "
                                     "devices, one Ray actor per device.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    kw = dict(epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)

    p = sub.add_parser("pull", help="download and convert the embedded default model", **kw)
    p.add_argument("name", choices=("smollm2",))
    p.add_argument("--quant", choices=PULL_SCHEMES, default=None,
                   help="also quantize it with llmcompressor (installed once into its own environment under "
                        "$RAYTP_HOME) and print that directory, a compressed-tensors checkpoint for --model")

    p = sub.add_parser("plan", help="show how a model would be split over devices (no Ray, no weights read)", **kw)
    _model_args(p, max_batch=8)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser("generate", help="generate a completion, streamed", **kw)
    _model_args(p, max_batch=1)
    _runtime_args(p)
    _sampling_args(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")

    p = sub.add_parser("chat", help="chat in the terminal (/reset clears the history, /exit quits)", **kw)
    _model_args(p, max_batch=1)
    _runtime_args(p)
    _sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")

    p = sub.add_parser("serve", help="serve an OpenAI-compatible API and a web chat on one port", **kw)
    _model_args(p, max_batch=8)
    _runtime_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface "
                   "(default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="the API (/v1) and the web chat (/) (default: 7860)")
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=os.environ.get("RAYTP_API_KEY"),
                     help="require 'Authorization: Bearer KEY' on the API and this password in the web chat "
                          "(default: $RAYTP_API_KEY, else none); visible in `ps`: prefer --api-key-file")
    key.add_argument("--api-key-file", default=None, metavar="PATH",
                     help="read the API key from the first line of PATH instead")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a free batch slot; "
                   "beyond them the API answers 429 (default: 64)")

    p = sub.add_parser("bench", help="benchmark sweep: decode and prefill tokens/s, all-reduce latency, roofline; "
                       "CSV, JSON, markdown summary and plots", **kw)
    _model_args(p, max_batch=0, sweep=True)
    p.add_argument("--devices-sweep", default=None, metavar="SPEC;SPEC...",
                   help='device SPECs separated by ";", one configuration each, e.g. '
                        '"cuda*1;cuda*2;cuda*4;cuda:0@48GiB,cuda:1@141GiB" (default: --devices alone)')
    p.add_argument("--comm", default="auto", help="comma-separated all-reduce backends to compare, of auto, "
                   "hoststaged, gloo, nccl, p2p; auto logs what it chose and why (default: auto); on one node of "
                   "GPUs every backend's all-reduce latency is reported too")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (default: $RAY_ADDRESS, else start a local one)")
    _option_args(p)
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    p.add_argument("--prompt-len", default="128", help="comma-separated prompt lengths in tokens (random ids; "
                   "default: 128)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per request (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration after one warm-up; the "
                   "median is kept (default: 3)")
    p.add_argument("--allreduce-sizes", default="4096,8192,131072,2097152",
                   help="all-reduce message sizes in elements, besides each batch's decode message "
                        "(default: 4096,8192,131072,2097152)")
    p.add_argument("--allreduce-iters", type=int, default=200, help="calls timed per size (default: 200)")
    p.add_argument("--share-gpus", action="store_true", help="with more cuda ranks than GPUs, let ranks share GPUs "
                   "(each then gets part of its GPU's bandwidth: emulates slower cards next to fast ones) instead of "
                   "skipping the configuration")
    p.add_argument("--no-p2p", action="store_true", help="emulate a host without GPU peer-to-peer (consumer cards): "
                   "NCCL_P2P_DISABLE=1 in every rank, so NCCL goes through host memory and p2p reports unavailable")
    p.add_argument("--hf-peer", action="store_true", help="also time Hugging Face transformers decoding the same "
                   "weights on one device, next to each one-device configuration (needs transformers)")
    p.add_argument("--profile", type=int, nargs="?", const=5, default=0, metavar="STEPS",
                   help="after the timed runs, profile STEPS decode steps on every rank with torch.profiler (default "
                        "5): ms per step in weight GEMMs, attention, all-reduce, small kernels and idle, per rank")
    p.add_argument("--profile-traces", action="store_true", help="with --profile, also save each rank's chrome "
                   "trace (open in https://ui.perfetto.dev) into OUT/traces")
    p.add_argument("--out", default=None, help="directory for results.csv, results.json, summary.md and the plots")
    return parser


def _devices(spec: str):
    """Parse SPEC; `auto` becomes every GPU of the cluster, or one CPU rank without GPUs."""
    if is_auto(spec):
        import ray

        n = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
        spec = f"cuda*{n}" if n else "cpu"
    return tuple(parse_devices(spec))


def cmd_pull(args) -> None:
    from raytp.weights.smollm2 import pull_smollm2
    from raytp.weights.smollm2_quantized import pull_quantized_smollm2

    print(pull_quantized_smollm2(args.quant)[0] if args.quant else pull_smollm2())


def cmd_plan(args) -> None:
    from raytp.model.pieces import plan_model
    from raytp.weights.source import ModelSource

    devices = _devices(args.devices)
    missing = [str(d) for d in devices if d.mem_bytes is None]
    if missing:
        raise UserError(f"`raytp plan` reads no hardware: give every device a budget (@MEM), e.g. cpu@2GiB; "
                        f"these have none: {', '.join(missing)}")
    bandwidths = [d.bandwidth for d in devices] if all(d.bandwidth for d in devices) else None
    if args.split == "speed" and bandwidths is None:
        raise UserError("`raytp plan --split speed` needs every device's bandwidth: add ~RATE to each device, "
                        "e.g. cuda:0@24GiB~0.94TB/s")

    config = ModelSource.parse(args.model).config()

    def plan_for(split: str | None):
        return plan_model(config, [(str(d), d.mem_bytes) for d in devices],
                           max_context=args.max_context, max_batch=args.max_batch, dtype=args.dtype,
                           bandwidths=bandwidths, split=split, kv_dtype=args.kv_dtype)

    plan = plan_for(args.split)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return
    print(plan.format_table())
    print(plan.describe_pieces())
    if bandwidths is not None:  # both splits' predicted batch-1 decode step, side by side
        for split in ("memory", "speed"):
            other = plan_for(split)
            print(f"{split} split: predicted step {1000 * other.step_seconds:.2f} ms (weights / bandwidth), rank "
                  f"{other.pacing_rank} paces it" + (" <- this plan" if split == plan.split else ""))


def _check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's minute of retries, when nothing listens at HOST:PORT."""
    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return  # ray://, "auto" and the like: let Ray resolve them
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at --address {address!r} ({e.strerror or e}); "
                        "start one with `ray start --head` or omit --address to run locally") from None


def _token_auth_hint() -> str:
    """Why a join may have failed that Ray's own error leaves out: a cluster with token authentication refuses a
    client without a token, and Ray reports that as an unreachable cluster."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        return ""
    return ("; if that cluster uses token authentication (its `ray start` ran with RAY_AUTH_MODE=token), set "
            "RAY_AUTH_MODE=token here too, with its token in ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN")


def ray_token_file() -> Path:
    """The token of the local Rays raytp starts: made once, mode 0600 from its first byte on."""
    from raytp.weights.smollm2 import raytp_home

    path = raytp_home() / TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp creates the file 0600; linking it into place is atomic and never replaces a token that a
        # concurrent raytp made first, so no process ever reads a partial or world-readable token
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{TOKEN_FILE}.")
        try:
            os.write(fd, os.urandom(32).hex().encode())
            os.close(fd)
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise UserError(f"the Ray token {path} is readable by others (mode {mode:o}); chmod 600 {path}")
    return path


@contextmanager
def local_ray_environment():
    """Environment for a Ray of our own: token authentication with raytp's token, every socket on 127.0.0.1.

    Ray reads both settings from the environment (its processes inherit it) and, in this process, when `ray` is
    imported: `raytp` imports it after this, but a caller that imported it before (tests calling main()) gets
    Ray's cached config refreshed the way Ray's own `ray.init` does when it turns token auth on. Restored on exit,
    so a later join of another cluster in this process sees the caller's settings."""
    settings = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_token_file()), "RAY_AUTH_TOKEN": None,
                # Ray's switch for single-machine clusters: the node address is 127.0.0.1, so every gRPC server,
                # agent and worker binds loopback only
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    saved = {k: os.environ.get(k) for k in settings}

    def apply(values: dict) -> None:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if "ray" in sys.modules:
            from ray._private import ray_constants
            from ray._raylet import AuthenticationTokenLoader, Config

            Config.initialize("")
            ray_constants.ENABLE_RAY_CLUSTER = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "1") != "0"
            # the token it loaded for our Ray would be sent to the next cluster this process joins, and refused
            AuthenticationTokenLoader.instance().reset_cache()

    apply(settings)
    try:
        yield
    finally:
        apply(saved)


def _drop_ray_worker_died_lines() -> None:
    """Keep Ray's error stream but drop its RAY_WORKER_DIED reports. Ray prints that stream from a thread of its
    own with no filter hook, so its printer is wrapped (once per process: main() may run more than once)."""
    from ray._private import worker

    if getattr(worker.print_to_stdstream, "drops_worker_died", False):
        return
    original = worker.print_to_stdstream

    def print_to_stdstream(data, ignore_prefix):
        lines = [line for line in data["lines"] if not line.startswith(RAY_WORKER_DIED)]
        if lines:
            original({**data, "lines": lines}, ignore_prefix)

    print_to_stdstream.drops_worker_died = True
    worker.print_to_stdstream = print_to_stdstream


@contextmanager
def ray_session(address: str | None, devices_spec: str):
    """Join `address` as its owner set it up, or start a local Ray (loopback only, token auth) with enough CPU
    slots for every cpu rank."""
    with ExitStack() as local:
        if address:
            import ray

            print(f"raytp: joining the Ray cluster at {address}", file=sys.stderr)
            _check_reachable(address)
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as e:
                raise UserError(f"cannot reach the Ray cluster at --address {address!r}: {_first_line(e)}"
                                f"{_token_auth_hint()}") from None
        else:
            local.enter_context(local_ray_environment())
            import ray

            print(f"raytp: starting Ray (local, 127.0.0.1 only, token auth: {os.environ['RAY_AUTH_TOKEN_PATH']})",
                  file=sys.stderr)
            cpu_ranks = sum(d.kind == "cpu" for d in parse_devices(devices_spec)) if not is_auto(devices_spec) else 1
            # address="local": always a fresh cluster of our own, never one another process left running
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, cpu_ranks), include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=False)
        _drop_ray_worker_died_lines()
        try:
            yield
        finally:
            ray.shutdown()


@contextmanager
def running_driver(args):
    """A started driver actor for the args' model and devices; shut down on exit."""
    import ray

    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raytp.actors.driver import DriverActor
    from raytp.actors.group import GroupSettings

    settings = GroupSettings(model=args.model, devices=_devices(args.devices), dtype=args.dtype,
                             kv_dtype=args.kv_dtype, comm=args.comm, max_context=args.max_context,
                             max_batch=args.max_batch, progress=False, options=args.options, split=args.split,
                             heartbeat_s=args.rank_timeout)
    # on this node: the HTTP server it runs must listen on this machine, and a lost node must not take it along
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    driver = DriverActor.options(scheduling_strategy=here).remote(settings)
    try:
        start = driver.start.remote()
        while not ray.wait([start], timeout=0.5)[0]:  # the driver's phases (placing, loading) as they happen
            _print_driver_logs(driver)
        info = ray.get(start)
        _print_driver_logs(driver)
        print(f"raytp: ready in {_since_command_start():.0f} s: {len(info['ranks'])} ranks, all-reduce "
              f"{info['backend']}", file=sys.stderr)
        yield driver, info
    finally:
        try:
            ray.get(driver.shutdown.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - the driver may be what failed; ray.shutdown cleans up after it
            pass


def _since_command_start() -> float:
    """Seconds since this process started: what the user waited, Python's and Ray's start-up included."""
    import psutil

    return time.time() - psutil.Process().create_time()


def _print_driver_logs(driver, timeout: float = 60) -> None:
    """Print the driver's `raytp` log lines since the last call; DriverDied when the driver is gone, or hung for
    `timeout` (its event loop answers in milliseconds: the heavy work runs in the ranks and in threads)."""
    import ray

    try:
        lines = ray.get(driver.take_logs.remote(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise DriverDied(f"the driver actor did not answer within {timeout:.0f} s") from None
    except ray.exceptions.RayActorError as e:
        raise DriverDied(f"the driver actor died ({_first_line(e)})") from None
    for line in lines:
        print(f"raytp: {line}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _sampling(args):
    """The sampling flags as SamplingParams: bad values fail here with the rule they break, as in the API."""
    from raytp.runtime.sampling import SamplingParams

    max_tokens = args.max_tokens if args.max_tokens is not None else min(DEFAULT_MAX_TOKENS, args.max_context // 2)
    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=max_tokens,
                          repetition_penalty=args.repetition_penalty, seed=args.seed)


def stream_answer(driver, echo: bool, params, **text) -> tuple[str, dict]:
    """Run one request (`text`: prompt= or messages=) through the driver's `submit`, which checks it as it checks
    an API request; print its text as it streams when `echo`. Returns (text, final stats)."""
    import ray

    prompt_ids = ray.get(driver.encode.remote(**text))
    pieces = []
    for ref in driver.submit.remote(prompt_ids, params):
        item = ray.get(ref)
        if "finish" in item:
            return "".join(pieces), item
        pieces.append(item["text"])
        if echo:
            print(item["text"], end="", flush=True)
    raise RuntimeError("the stream ended without a final item")


def cmd_generate(args) -> None:
    with ray_session(args.address, args.devices), running_driver(args) as (driver, info):
        request = {"messages": [{"role": "user", "content": args.prompt}]} if args.chat else {"prompt": args.prompt}
        text, stats = stream_answer(driver, not args.json, params=_sampling(args), **request)
        if args.json:
            print(json.dumps({"text": text, "token_ids": stats["token_ids"], "prompt_tokens": stats["prompt_tokens"],
                              "generated_tokens": stats["generated_tokens"], "tokens_per_s": stats["tokens_per_s"],
                              "ttft_s": stats["ttft_s"], "finish": stats["finish"], "backend": info["backend"],
                              "plan": info["plan"]}))
        else:
            print(f"\n[{stats['generated_tokens']} tokens, {stats['tokens_per_s']:.1f} tokens/s, "
                  f"first token {stats['ttft_s'] * 1000:.0f} ms]", file=sys.stderr)


def cmd_chat(args) -> None:
    with ray_session(args.address, args.devices), running_driver(args) as (driver, info):
        print(info["plan_table"], file=sys.stderr)
        print("Type a message; /reset clears the history, /exit quits.", file=sys.stderr)
        system = [{"role": "system", "content": args.system}] if args.system else []
        history = list(system)
        while True:
            try:
                line = input("\n> ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return
            if line in ("/exit", "/quit"):
                return
            if line == "/reset":
                history = list(system)
                print("(history cleared)")
                continue
            if not line:
                continue
            history.append({"role": "user", "content": line})
            try:
                answer, stats = stream_answer(driver, True, messages=history, params=_sampling(args))
            except Exception as e:  # noqa: BLE001 - a failed turn (too long, rank died) keeps the session
                history.pop()
                print(f"\nraytp: {_user_message(e) or e}", file=sys.stderr)
                continue
            history.append({"role": "assistant", "content": answer})
            print(f"\n[{stats['generated_tokens']} tokens, {stats['tokens_per_s']:.1f} tokens/s]", file=sys.stderr)


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

    parts = ["raytp", "bench", "--model", args.model, "--devices-sweep" if len(specs) > 1 else "--devices",
             ";".join(specs), "--comm", args.comm, "--dtype", args.dtype, "--kv-dtype", args.kv_dtype, "--batch",
             args.batch, "--prompt-len", args.prompt_len, "--decode-tokens", str(args.decode_tokens), "--repeats",
             str(args.repeats), "--allreduce-sizes", args.allreduce_sizes, "--allreduce-iters",
             str(args.allreduce_iters), *args.options.flags()]
    optional = {"--quant": args.quant, "--split": args.split, "--out": args.out}
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
    config = ModelSource.parse(args.models[0]).config()  # checked before Ray by _check_args
    widest = max(specs, key=lambda s: 1 if is_auto(s) else sum(d.kind == "cpu" for d in parse_devices(s)))
    with ray_session(args.address, widest):
        sweep = Sweep(models=tuple(args.models), device_sets=tuple((s, _devices(s)) for s in specs), comms=tuple(comms),
                      batches=tuple(batches), prompt_lens=tuple(prompt_lens), dtype=args.dtype,
                      kv_dtype=args.kv_dtype, decode_tokens=args.decode_tokens, repeats=args.repeats,
                      max_context=args.max_context, max_batch=args.max_batch, allreduce_sizes=tuple(sizes),
                      allreduce_iters=args.allreduce_iters, options=args.options,
                      splits=tuple(dict.fromkeys(splits)), share_gpus=args.share_gpus, no_p2p=args.no_p2p,
                      profile_steps=args.profile,
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


def _check_port(host: str, port: int) -> None:
    """Fail in seconds, not after loading the model, when the host is not this machine's or the port is taken."""
    from raytp.serving.sockets import listen_socket

    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, got {port}")
    try:
        listen_socket(host, port).close()
    except socket.gaierror as e:
        raise UserError(f"--host {host!r} is not an address ({e.strerror}); give one of this machine's addresses, "
                        "e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    except OSError as e:
        if e.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host!r} is not an address of this machine; give one of its own, e.g. "
                            "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); is another server using port {port}? "
                        f"Choose another with --port") from None


def _api_key(args) -> str | None:
    """--api-key-file's first line, else --api-key (or $RAYTP_API_KEY)."""
    if args.api_key_file is None:
        return args.api_key
    try:
        lines = Path(args.api_key_file).read_text().splitlines()
    except OSError as e:
        raise UserError(f"cannot read --api-key-file {args.api_key_file!r} ({e.strerror})") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise UserError(f"--api-key-file {args.api_key_file!r} is empty; put the key on its first line")
    return key


def cmd_serve(args) -> None:
    import signal
    import threading

    stop = threading.Event()

    def on_signal(*_):
        if stop.is_set():  # a second Ctrl-C: stop waiting for the clean shutdown
            raise KeyboardInterrupt
        stop.set()

    # until the server is up, SIGTERM interrupts start-up the way Ctrl-C does, so the cleanup below still runs
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with ray_session(args.address, args.devices), running_driver(args) as (driver, info):
        import ray

        url = ray.get(driver.serve.remote(args.host, args.port, args.api_key, args.max_queue))
        print(info["plan_table"], file=sys.stderr)
        print(f"raytp: serving {args.model}: web chat {url} , OpenAI API {url}v1 ; Ctrl-C stops", file=sys.stderr)
        print(url, flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        while not stop.wait(1.0):
            _print_driver_logs(driver)  # also the liveness check: a dead driver ends `serve` within seconds
        print("raytp: shutting down", file=sys.stderr)


COMMANDS = {"pull": cmd_pull, "plan": cmd_plan, "generate": cmd_generate, "chat": cmd_chat, "bench": cmd_bench,
            "serve": cmd_serve}


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
    capped = sum(d.mem_bytes for d in cpus if d.mem_bytes is not None)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if capped > total:
        raise UserError(f"--devices {spec!r} gives its cpu ranks {format_bytes(capped)} in all, this machine has "
                        f"{format_bytes(total)} of memory; lower the @MEM caps")


def _check_args(args) -> None:
    """Check every argument before Ray starts: a mistake costs a second, not a cluster start-up and a model load.

    Cheapest first: the sampling and model checks import torch, the model check may download smollm2."""
    if not hasattr(args, "devices"):  # `pull`
        return
    if args.command == "serve":
        if args.max_queue < 0:
            raise UserError(f"--max-queue must be >= 0, got {args.max_queue}")
        args.api_key = _api_key(args)  # read once, here: a missing file fails now
        _check_port(args.host, args.port)
    if args.max_context < 1:
        raise UserError(f"--max-context must be >= 1, got {args.max_context}")
    if hasattr(args, "rank_timeout") and not 0 < args.rank_timeout < float("inf"):
        raise UserError(f"--rank-timeout must be a number of seconds > 0, got {args.rank_timeout}")
    if args.max_batch < (0 if args.command == "bench" else 1):  # bench: 0 sizes the cache for each batch it runs
        raise UserError(f"--max-batch must be >= {0 if args.command == 'bench' else 1}, got {args.max_batch}")
    if args.command == "generate" and not args.chat and not args.prompt:
        raise UserError("--prompt is empty: give the text to continue (or --chat to send it as a chat message)")
    if args.kv_dtype == "fp8" and args.command != "plan":  # `plan` only counts bytes; the ranks need float8
        _check_fp8_cache()
    if args.command == "bench":
        if args.profile < 0:
            raise UserError(f"--profile takes a number of steps (0: none), got {args.profile}")
        if args.profile_traces and not (args.profile and args.out):
            raise UserError("--profile-traces saves the traces of --profile into --out: give --profile and --out DIR")
    specs = [s.strip() for s in (getattr(args, "devices_sweep", None) or args.devices).split(";") if s.strip()]
    for spec in specs:
        if not is_auto(spec):
            parse_devices(spec)
            if args.command != "plan" and not args.address:
                _check_devices_fit_here(spec)
    if hasattr(args, "temperature"):
        if args.max_tokens is not None and args.max_tokens >= args.max_context:
            raise UserError(f"--max-tokens {args.max_tokens} does not fit in --max-context {args.max_context}, "
                            "which also holds the prompt; lower --max-tokens or raise --max-context")
        try:
            _sampling(args)  # the rules live in SamplingParams alone; its message names the value
        except ValueError as e:
            raise UserError(str(e)) from None
    if args.command == "bench":
        args.models = _bench_models(args.model, args.quant)
    elif args.quant:
        args.model = _quantized(args.model, args.quant, args.quant)
    for model in getattr(args, "models", [args.model]):
        _check_model(model)
    if args.command in ("generate", "chat", "serve"):
        config = _model_config(args.model)
        if hasattr(args, "top_k"):
            _check_top_k(args.top_k, config.vocab_size)
        _check_plan_fits(args, config)
    if getattr(args, "hf_peer", False):
        from raytp.weights.source import ModelSource

        for model in args.models:
            source = ModelSource.parse(model)
            config = source.config()
            if config.quant is not None:
                raise UserError(f"--hf-peer runs transformers on dense weights; {model!r} is quantized "
                                f"({config.quant.describe()})")
            if config.moe is not None and source.is_synthetic:  # transformers 5 holds experts fused, under other
                # names than a checkpoint's: only its own loader converts them
                raise UserError(f"--hf-peer loads a mixture of experts through transformers' from_pretrained; "
                                f"{model!r} is synthetic: give a model directory, or leave out --hf-peer")


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

    from raytp.model.pieces import plan_model
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
    try:
        plan_model(config, budgets, max_context=args.max_context, max_batch=args.max_batch, dtype=args.dtype,
                    bandwidths=bandwidths, split=args.split if bandwidths else "memory", kv_dtype=args.kv_dtype)
    except PlanError as e:
        raise UserError(str(e)) from None


def _quantized(model: str, quant: str, given: str) -> str:
    """The spec that carries --quant `quant` to every rank: `model`@`quant` (for none, `model` itself); `given` is
    the --quant text, for the message."""
    if not model.startswith("synthetic:") or "@" in model:
        raise UserError(f"--quant {given} applies to a synthetic model without an @ suffix, not {model!r}; a "
                        "checkpoint's quantization comes from its config.json")
    return model if quant == NO_QUANT else f"{model}@{quant}"


def _bench_models(model: str, text: str | None) -> list[str]:
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


def _user_message(e: BaseException) -> str | None:
    """The one-line message of an error caused by the input, unwrapping Ray's task errors; else None."""
    if isinstance(e, (UserError, DeviceSpecError)):  # before the imports below, which take seconds
        return str(e).strip()
    from raytp.actors.group import ClusterError
    from raytp.parallel.comm import CommError
    from raytp.model.config import UnsupportedModelError
    from raytp.weights.checkpoint import CheckpointError

    cause = getattr(e, "cause", None)
    if cause is not None and cause is not e:
        return _user_message(cause)
    if isinstance(e, (ValueError, ClusterError, CommError, UnsupportedModelError,
                      CheckpointError, FileNotFoundError, RuntimeError)) and not isinstance(e, NotImplementedError):
        return str(e).strip()
    return None


def _no_color_reset_at_exit() -> None:
    """Ray imports colorama, whose exit handler writes ESC[0m to a terminal's stdout after the command's output;
    raytp prints no colors to reset."""
    import atexit

    if "colorama.initialise" in sys.modules:
        atexit.unregister(sys.modules["colorama.initialise"].reset_all)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="raytp: %(message)s", stream=sys.stderr)
    try:
        _check_args(args)
        COMMANDS[args.command](args)
        sys.stdout.flush()  # here, where a closed pipe can still be handled
    except BrokenPipeError:  # `raytp plan --json | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return 141  # as a shell reports a command ended by SIGPIPE
    except KeyboardInterrupt:
        return 130
    except DriverDied as e:
        print(f"raytp: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - input errors become one line; anything else keeps its traceback
        message = _user_message(e)
        if message is None:
            raise
        print(f"raytp: error: {message}", file=sys.stderr)
        return 2
    finally:
        _no_color_reset_at_exit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
