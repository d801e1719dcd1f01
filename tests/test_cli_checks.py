"""What the CLI settles before Ray starts, in process (no subprocess, no Ray): the prompt's tokens against the
context, cuda ranks against this machine's GPUs, token ids for a synthetic model, and the sampling defaults a model
ships in generation_config.json (read as transformers' GenerationConfig reads the same file)."""

from __future__ import annotations

import json

import pytest
import ray
import torch

from raytp import cli
from raytp.cli.checks import check_args
from raytp.cli.parser import build_parser
from raytp.cli.sampling import sampling_params
from raytp.serving.openai_api import parse_completion
from raytp.weights.generation_defaults import SamplingDefaults

SMALL = ["--devices", "cpu@1GiB"]
LLAMA = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [1, 2]}  # Llama 3.1 Instruct's
QWEN3 = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}  # Qwen3's
GREEDY_CONFIGS = [{"bos_token_id": 1, "eos_token_id": 2}, {"do_sample": False, "temperature": 0.7},
                  {"repetition_penalty": 1.1}]


def refused(capsys, *argv: str) -> str:
    """`raytp ARGV` in process: exit status 2, one `raytp: error:` line, and no Ray started."""
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raytp: error: "), err
    assert not ray.is_initialized()
    return err[0]


def with_generation_config(smollm2_dir, tmp_path, config: dict | None):
    """SmolLM2's files (linked) in a directory of its own, with `config` as its generation_config.json."""
    model = tmp_path / "model"
    model.mkdir()
    for f in smollm2_dir.iterdir():
        (model / f.name).symlink_to(f)
    if config is not None:
        (model / "generation_config.json").write_text(json.dumps(config))
    return model


# ---- checked before Ray -------------------------------------------------------------------------------------

@pytest.mark.parametrize("chat", [False, True])
def test_a_prompt_longer_than_the_context(capsys, smollm2_dir, chat):
    from transformers import AutoTokenizer

    text = "Rome was not built in a day. " * 40
    reference = AutoTokenizer.from_pretrained(smollm2_dir)
    n = len(reference.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"] if chat
            else reference(text, add_special_tokens=False)["input_ids"])
    line = refused(capsys, "generate", "--prompt", text, *(["--chat"] if chat else []), *SMALL, "--max-context", "64")
    assert f"the prompt has {n} tokens but the context holds 64 (--max-context)" in line, line


def test_cuda_ranks_on_a_machine_without_gpus(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    line = refused(capsys, "generate", "--prompt", "hi", "--devices", "cuda*2")
    assert "'cuda*2' asks for 2 cuda ranks" in line and "no GPU" in line and "cpu*2" in line, line


def test_a_joined_cluster_may_have_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    args = build_parser().parse_args(["generate", "--model", "synthetic:tiny", "--prompt-ids", "1,2", "--devices",
                                      "cuda*2", "--address", "10.0.0.1:6379"])
    check_args(args)


def test_a_synthetic_model_takes_token_ids(capsys):
    line = refused(capsys, "generate", "--model", "synthetic:tiny", "--prompt", "hi", *SMALL)
    assert "synthetic:tiny is synthetic and has no tokenizer" in line and "--prompt-ids 1,2,3" in line, line
    args = build_parser().parse_args(["generate", "--model", "synthetic:tiny", "--prompt-ids", "1, 2,3", *SMALL])
    check_args(args)
    assert args.prompt_ids == [1, 2, 3] and not ray.is_initialized()


@pytest.mark.parametrize("ids, named", [("1,2,x", "got '1,2,x'"), (",", "got ','"),
                                        ("1,1000", "[0, 1000) (the vocabulary); position 1 has 1000")])
def test_bad_prompt_ids(capsys, ids, named):
    line = refused(capsys, "generate", "--model", "synthetic:tiny", "--prompt-ids", ids, *SMALL)
    assert named in line, line


def test_prompt_ids_with_chat(capsys):
    line = refused(capsys, "generate", "--model", "synthetic:tiny", "--prompt-ids", "1", "--chat", *SMALL)
    assert "--chat" in line and "--prompt-ids" in line, line


# ---- the model's own sampling defaults ------------------------------------------------------------------------

@pytest.mark.parametrize("config", [LLAMA, QWEN3, {"temperature": 0.8, "repetition_penalty": 1.2}])
def test_defaults_are_what_transformers_reads(tmp_path, config):
    from transformers import GenerationConfig

    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    reference = GenerationConfig.from_pretrained(tmp_path)
    given = {k for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in config}
    defaults = SamplingDefaults.read(tmp_path)
    assert {k: getattr(defaults, k) for k in given} == {k: getattr(reference, k) for k in given}
    off = {"top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}  # what the file leaves out is off
    assert {k: getattr(defaults, k) for k in off.keys() - given} == {k: off[k] for k in off.keys() - given}
    assert defaults.source == str(tmp_path / "generation_config.json")


@pytest.mark.parametrize("config", [None, *GREEDY_CONFIGS])
def test_greedy_where_the_model_names_no_temperature(tmp_path, config):
    if config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert SamplingDefaults.read(tmp_path).temperature == 0
    assert SamplingDefaults.read(None) == SamplingDefaults()  # a synthetic model
    if config is not None and config.get("do_sample") is False:
        from transformers import GenerationConfig

        assert not GenerationConfig.from_pretrained(tmp_path).do_sample  # transformers decodes it greedily too


def test_a_broken_generation_config_is_refused_naming_it(capsys, smollm2_dir, tmp_path):
    model = with_generation_config(smollm2_dir, tmp_path, {"temperature": 5.0})
    line = refused(capsys, "generate", "--model", str(model), "--prompt", "hi", *SMALL)
    assert "generation_config.json" in line and "temperature must be in [0, 2" in line and "got 5.0" in line, line
    (model / "generation_config.json").unlink()
    (model / "generation_config.json").write_text("{")
    line = refused(capsys, "generate", "--model", str(model), "--prompt", "hi", *SMALL)
    assert "cannot read" in line and "generation_config.json" in line, line


@pytest.mark.parametrize("config", [QWEN3, None])
def test_cli_and_api_default_to_the_models_sampling(smollm2_dir, tmp_path, config):
    model = with_generation_config(smollm2_dir, tmp_path, config)
    want = dict(temperature=0.6, top_p=0.95, top_k=20) if config else dict(temperature=0.0, top_p=1.0, top_k=0)
    for command in (["generate", "--prompt", "hi"], ["chat"]):
        args = build_parser().parse_args([*command, "--model", str(model), *SMALL])
        check_args(args)
        params = sampling_params(args, args.sampling_defaults)
        assert dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k) == want
    args = build_parser().parse_args(["generate", "--prompt", "hi", "--model", str(model), "--temperature", "0.2",
                                      "--top-k", "0", *SMALL])
    check_args(args)
    assert (sampling_params(args, args.sampling_defaults).temperature, sampling_params(args, args.sampling_defaults)
            .top_k) == (0.2, 0)  # a flag overrides its default
    defaults = SamplingDefaults.read(model)
    request = parse_completion({"model": "m", "prompt": "hi"}, chat=False, model_id="m")
    params = request.sampling(defaults)
    assert dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k) == want
    request = parse_completion({"model": "m", "prompt": "hi", "temperature": 1.0, "top_k": None}, chat=False,
                               model_id="m")
    assert (request.sampling(defaults).temperature, request.sampling(defaults).top_k) == (1.0, want["top_k"])
    assert not ray.is_initialized()


def test_help_says_where_the_defaults_come_from(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    out = capsys.readouterr().out
    text = " ".join(out[out.index("options:"):].split())  # past the usage line
    for flag in ("--temperature", "--top-p", "--top-k", "--repetition-penalty"):
        help_text = text[text.index(flag + " "):]
        assert "generation_config.json" in help_text[:200], (flag, help_text[:200])


# ---- smaller frictions --------------------------------------------------------------------------------------

def test_raytp_alone_prints_the_help(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: raytp") and "generate" in out and "device SPEC" in out


def test_plan_with_no_arguments_plans_this_machine_as_generate_would(capsys):
    """`raytp plan` alone: auto is this machine (here one cpu rank with its available memory), at generate's
    --max-batch, so both show the same split."""
    import psutil

    parser = build_parser()
    assert parser.parse_args(["plan"]).max_batch == parser.parse_args(["generate", "--prompt", "x"]).max_batch
    before = psutil.virtual_memory().available
    assert cli.main(["plan", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    (rank,) = plan["ranks"]  # no GPU here
    assert rank["device"].startswith("cpu@") and abs(rank["budget_bytes"] - before) < 2 << 30
    assert plan["max_batch"] == 1 and not ray.is_initialized()


def test_plan_shows_the_draft_model_split_beside_the_model(capsys, smollm2_dir):
    """`raytp plan --speculate draft:PATH`: the draft's split over the same devices, and the model's over what each
    device has left, together within each budget."""
    devices = "cpu@900MiB,cpu@600MiB"
    assert cli.main(["plan", "--devices", devices, "--speculate", "draft:smollm2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    draft = plan["draft_plan"]
    for rank, beside, cap in zip(plan["ranks"], draft["ranks"], (900 << 20, 600 << 20)):
        held = sum(beside[k] for k in ("weight_bytes", "kv_cache_bytes", "overhead_bytes"))
        assert beside["budget_bytes"] == cap and rank["budget_bytes"] == cap - held and rank["headroom_bytes"] >= 0
        assert beside["weight_bytes"] > 0 and rank["weight_bytes"] > 0
    assert cli.main(["plan", "--devices", devices, "--speculate", "draft:smollm2"]) == 0
    assert "draft model smollm2:" in capsys.readouterr().out


def test_the_help_lists_every_synthetic_model_and_quantization(capsys):
    from raytp.cli.parser import EPILOG, SYNTHETIC_DENSE, SYNTHETIC_MOE, SYNTHETIC_TEST
    from raytp.model.config import QUANT_PRESETS
    from raytp.weights.synthetic import CONFIGS

    assert sorted((*SYNTHETIC_DENSE, *SYNTHETIC_MOE, SYNTHETIC_TEST)) == sorted(CONFIGS)
    text = " ".join(EPILOG.split())
    assert all(name in text for name in CONFIGS) and all(q in text for q in QUANT_PRESETS)
    assert "(also" not in text and "~RATE" in text and "huggingface-cli download" in text


def test_a_hub_id_says_how_to_get_the_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no such directory here
    line = refused(capsys, "generate", "--prompt", "hi", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct", *SMALL)
    assert "does not download from the Hub" in line, line
    assert "huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct --local-dir DIR" in line, line


def test_one_rank_is_one_rank(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert "asks for 1 cuda rank;" in refused(capsys, "generate", "--prompt", "hi", "--devices", "cuda")


def test_pull_quant_prints_a_line_per_step_and_keeps_the_output_in_a_file(capfd, tmp_path, monkeypatch):
    """`raytp pull smollm2 --quant` runs pip and llmcompressor (hundreds of lines): the terminal gets one line per
    step naming the file that keeps their output; a failure ends with the end of that output."""
    import sys

    from raytp.weights import smollm2_quantized

    monkeypatch.setenv("RAYTP_HOME", str(tmp_path))
    smollm2_quantized._run([sys.executable, "-c", "for i in range(800): print('step line', i)"], "a step", True)
    log = smollm2_quantized.log_file()
    assert capfd.readouterr().err.splitlines() == [f"raytp: a step (its output: {log}) ..."]
    assert "step line 799" in log.read_text()
    ending = r"exited with 3; the end of its output \(.*llmcompressor.log\):\n(.|\n)*boom"
    with pytest.raises(RuntimeError, match=ending):
        smollm2_quantized._run([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], "a failing step", False)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["chat"], ["serve"], ["bench"]])
def test_a_bad_speculate_is_refused_naming_it_on_every_command(capsys, command):
    line = refused(capsys, *command, *SMALL, "--speculate", "ngram:9")
    assert "speculate" in line and "'ngram:9'" in line and "[1, 8]" in line


def test_a_draft_model_is_named_loads_and_shares_the_models_vocabulary(capsys, smollm2_dir, tmp_path):
    line = refused(capsys, "generate", "--prompt", "hi", *SMALL, "--speculate", "draft:3")
    assert "--speculate draft:3: name the draft model, draft:PATH or draft:PATH:K" in line
    line = refused(capsys, "serve", *SMALL, "--speculate", f"draft:{tmp_path}")
    assert line.startswith(f"raytp: error: --speculate draft:{tmp_path}: ") and "config.json" in line
    import transformers

    other = transformers.LlamaConfig(vocab_size=1000, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                                     intermediate_size=64, num_hidden_layers=1)
    transformers.LlamaForCausalLM(other).save_pretrained(tmp_path / "small", safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "small" / name).symlink_to(smollm2_dir / name)
    capsys.readouterr()
    line = refused(capsys, "chat", *SMALL, "--speculate", f"draft:{tmp_path / 'small'}:2")
    assert "the draft model's vocabulary has 1000 tokens, smollm2's 49152" in line


def test_a_draft_model_reaches_the_group_and_its_k_every_request(smollm2_dir):
    args = build_parser().parse_args(["serve", "--devices", "cpu@2GiB", "--speculate", "draft:smollm2:3"])
    check_args(args)
    assert (args.draft_model, args.speculate) == ("smollm2", "draft:3")
    from raytp.cli.bench import _bench_command

    args = build_parser().parse_args(["bench", "--devices", "cpu@2GiB", "--speculate", "draft:smollm2:3"])
    check_args(args)
    assert (args.draft_model, args.speculate) == ("smollm2", "draft:3")
    assert "--speculate draft:smollm2:3" in _bench_command(args, ["cpu@2GiB"])  # the command that reproduces it


def test_speculate_reaches_the_cli_request_and_the_servers_default(smollm2_dir):
    args = build_parser().parse_args(["generate", "--prompt", "hi", "--speculate", "ngram:3"])
    assert sampling_params(args, SamplingDefaults()).speculate == "ngram:3"
    body = {"model": "m", "prompt": "x"}
    assert parse_completion(body, chat=False, model_id="m").sampling(None, "ngram").speculate == "ngram"
    assert parse_completion(body | {"speculate": "off"}, chat=False, model_id="m").sampling(None, "ngram").speculate \
        == "off"
