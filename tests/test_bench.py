"""`raytp bench` end to end on CPU ranks: results.json has every figure, and every figure is positive. Each run
joins the run's Ray head (tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raytp.cli import main
from raytp.weights.synthetic import synthetic_config


def test_bench_sweep_writes_csv_json_summary_and_plots(ray_head, smollm2_dir, tmp_path, capsys):
    """SmolLM2 on 1 and 3 CPU ranks: every figure of each run in results.json, results.csv, the summary and the plots;
    one device's tokens are the Hugging Face peer's."""
    import csv

    import matplotlib.image

    from raytp.bench.report import COLUMNS, PLOTS

    out = tmp_path / "sweep"
    # nccl on cpu ranks cannot run: those configurations are skipped (at once, before any actor starts)
    rc = main(["bench", "--model", str(smollm2_dir), "--devices-sweep", "cpu*1;cpu*3", "--comm",
               "hoststaged,nccl", "--dtype", "float32", "--batch", "1,2", "--prompt-len", "8", "--decode-tokens", "6",
               "--repeats", "1", "--allreduce-sizes", "576,4096", "--allreduce-iters", "5", "--hf-peer", "--out",
               str(out), "--address", ray_head.address])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["runs"][1]
    assert res["backend"] == "hoststaged" and res["devices"] == ["cpu", "cpu", "cpu"]
    assert len(res["bandwidth_bytes_per_s"]) == 3 and min(res["bandwidth_bytes_per_s"]) > 0
    assert set(res["allreduce_us"]["rank0"]) == {"576", "4096"}
    assert min(res["allreduce_us"]["slowest_rank"].values()) > 0
    assert [d["batch"] for d in res["decode"]] == [1, 2]
    for d in res["decode"]:
        assert d["steps_timed"][0] >= 3  # whole-batch steps only: 6 tokens give 5 decode steps
        for key in ("ms_per_step", "tokens_per_s", "roofline_ms", "roofline_fraction"):
            assert d[key] > 0, key
        assert len(d["greedy_tokens"]) == 6
        assert (d["speculate"], d["tokens_per_step"], d["acceptance"]) == ("off", 1, None)  # a token per step
    # the same first prompt, greedy: batching must not change its tokens
    assert res["decode"][0]["greedy_tokens"] == res["decode"][1]["greedy_tokens"]
    assert "of roofline" in capsys.readouterr().out
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert len(rows) == 2 * 2 * 1 * 2  # device sets x backends x prompt lengths x batch sizes
    ok = [r for r in rows if r["status"] == "ok"]
    assert [(r["devices"], r["batch"]) for r in ok] == [(f"cpu*{n}", b) for n in (1, 3) for b in ("1", "2")]
    assert all(r["status"] == "skipped" and r["reason"].startswith("ClusterError: --comm nccl needs")
               for r in rows if r["comm"] == "nccl")
    for r in ok:
        assert r["backend"] == "hoststaged" and int(r["ranks"]) == int(r["devices"][-1])
        for key in ("tokens_per_s", "ideal_tokens_per_s", "roofline_tokens_per_s", "compute_ms", "allreduce_ms",
                    "prefill_tokens_per_s"):
            assert float(r[key]) > 0, key
        # the breakdown adds up to the measured step by construction
        parts = float(r["compute_ms"]) + float(r["allreduce_ms"]) + float(r["overhead_ms"])
        assert abs(parts - float(r["ms_per_token"])) < 1e-6
        assert int(r["allreduces_per_step"]) == 1 + 2 * 30  # SmolLM2: 30 layers
    one = [r for r in ok if r["ranks"] == "1"]
    assert all(float(r["ideal_tokens_per_s"]) == float(r["tokens_per_s"]) for r in one)
    # the Hugging Face peer decodes the same weights greedily: the same tokens as raytp on one device
    assert all(float(r["hf_tokens_per_s"]) > 0 and r["hf_same_tokens"] == "True" for r in one)
    res = json.loads((out / "results.json").read_text())
    assert len(res["rows"]) == len(rows) and len(res["runs"]) == 2
    summary = (out / "summary.md").read_text()
    assert "overhead = the measured step - compute - all-reduce" in summary
    assert "`cpu*3` quant none, --comm nccl, prompt 8: **skipped**" in summary
    # the pieces SmolLM2 declares (3 KV groups of 3 query heads, MLP columns, vocab rows), every rank's range
    assert "| devices | quant | split | rank | device | query heads | KV heads | MLP columns | vocab rows |" in summary
    assert "| `cpu,cpu,cpu` | none | memory | 2 | `cpu` | 3 [6:9] | 1 [2:3] |" in summary
    for name in PLOTS:
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name


def test_sweep_cut_short_keeps_the_configurations_it_finished(ray_head, smollm2_dir, tmp_path, monkeypatch):
    """Cut short in its second configuration, a sweep keeps the first; that one speculates with SmolLM2 drafting for
    itself: nearly every drafted token accepted, several tokens per step, the command in the summary."""
    import csv

    import raytp.bench.sweep

    real, calls = raytp.bench.sweep.run_bench, []

    def interrupted_after_one(*args, **kwargs):  # Ctrl-C (or a lost cluster) while the second one runs
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(raytp.bench.sweep, "run_bench", interrupted_after_one)
    out = tmp_path / "sweep"
    rc = main(["bench", "--model", str(smollm2_dir), "--devices-sweep", "cpu*1;cpu*2;cpu*3", "--comm", "hoststaged",
               "--dtype", "float32", "--batch", "1", "--prompt-len", "8", "--decode-tokens", "12", "--repeats", "1",
               "--allreduce-sizes", "576", "--allreduce-iters", "5", "--speculate", f"draft:{smollm2_dir}:4", "--out",
               str(out), "--address", ray_head.address])
    assert rc == 130 and len(calls) == 2
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["devices"], r["status"]) for r in rows] == [("cpu*1", "ok")]
    assert float(rows[0]["tokens_per_s"]) > 0
    (d,) = json.loads((out / "results.json").read_text())["runs"][0]["decode"]
    assert d["speculate"] == f"draft:{smollm2_dir}:4" and d["acceptance"] >= 0.9 and d["tokens_per_step"] > 2
    summary = (out / "summary.md").read_text()
    assert "(in progress or cut short: 2 more planned)" in summary
    assert f"--speculate draft:{smollm2_dir}:4" in summary  # the command, reproducible


def test_the_split_table_shows_each_layer_kinds_pieces_and_state_per_rank():
    """A Qwen3.5 run's plan: every rank's linear-attention key and value heads beside its KV heads and expert
    columns, and the conv and recurrent state of its linear-attention layers apart from the KV cache; a results.json
    from before plans named their states still renders."""
    from raytp.bench.report import _pieces_table
    from raytp.model.pieces import plan_model
    from raytp.parallel.devices import format_bytes

    budgets = [("cuda:0@32GiB", 32 << 30), ("cuda:1@20GiB", 20 << 30), ("cuda:2@20GiB", 20 << 30)]
    plan = plan_model(synthetic_config("synthetic:qwen3.5-35b-a3b@w4a16"), budgets, max_context=4096, max_batch=8,
                      dtype="bfloat16")
    run = {"devices": [d for d, _ in budgets], "plan": plan.to_dict()}
    table = _pieces_table({"runs": [run]})
    assert table[2] == ("| devices | quant | split | rank | device | linear value heads | linear key heads | "
                        "expert columns | MLP columns | query heads | KV heads | vocab rows | conv + recurrent state "
                        "| KV cache |")
    for r, row in zip(plan.ranks, table[4:]):
        heads = f"{len(r.linear_key_heads)} [{r.linear_key_heads.start}:{r.linear_key_heads.stop}]"
        states = [format_bytes(r.state_bytes[s]) for s in ("conv + recurrent state", "KV cache")]
        assert row.endswith(" | ".join(states) + " |") and f"| {heads} |" in row
    assert sum(len(r.linear_key_heads) for r in plan.ranks) == 16
    for r in run["plan"]["ranks"]:
        del r["state_bytes"]
    assert _pieces_table({"runs": [run]})[2].endswith("| vocab rows |")


def test_every_backends_latency_table_has_a_row_per_group_and_backend():
    from raytp.bench.report import _backends_table

    runs = [{"spec": "cuda*2", "quant": "none", "comm": "p2p",
             "backend_us": {"p2p": {"4096": 6.4}, "nccl": {"4096": 11.5}}},
            {"spec": "cuda*2", "quant": "w4a16", "comm": "auto", "backend_us": {"nccl": {"4096": 12.9, "65536": 13.5}}},
            {"spec": "cpu*2", "quant": "none", "comm": "hoststaged", "backend_us": {}}]
    table = _backends_table({"runs": runs})
    assert table[0] == "| devices | quant | group's --comm | backend | 4096 el. | 65536 el. |"
    assert len(table) == 2 + 3 and "| `cuda*2` | w4a16 | auto | nccl | 12.9 | 13.5 |" in table
    assert _backends_table({"runs": runs[2:]}) == ["(no group of several GPUs on one node)"]


def test_bench_sweeps_quantizations_side_by_side_and_profiles_each_rank(ray_head, tmp_path, monkeypatch):
    """`--quant none,w4a16` at 1 and 2 CPU ranks: a row per (device set, quantization), each plot and the summary
    show both series, and the w4a16 rows' roofline reads less by exactly what the planner counts. `--profile`: each
    rank's profiled steps split into the classes of raytp.bench.profile, adding up to the step; two ranks sum their
    partial results, so there is all-reduce time; the traces are saved."""
    import csv
    import gzip

    import matplotlib.figure

    from raytp.bench.profile import CLASSES, STEP_MARK
    from raytp.model.pieces import plan_model
    from raytp.weights.synthetic import synthetic_config

    labels: dict[str, list[str]] = {}  # plot file -> its legend entries and axis tick labels
    savefig = matplotlib.figure.Figure.savefig

    def recording_savefig(fig, path, *args, **kwargs):
        labels[Path(path).name] = [t.get_text() for ax in fig.axes for t in
                                   (*(ax.get_legend().get_texts() if ax.get_legend() else ()), *ax.get_yticklabels())]
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    out = tmp_path / "quant"
    rc = main(["bench", "--model", "synthetic:tiny", "--quant", "none,w4a16", "--devices-sweep", "cpu*1;cpu*2",
               "--comm", "hoststaged", "--dtype", "float32", "--batch", "1", "--prompt-len", "8", "--decode-tokens",
               "4", "--repeats", "1", "--allreduce-sizes", "512", "--allreduce-iters", "5", "--profile", "3",
               "--profile-traces", "--out", str(out), "--address", ray_head.address])
    assert rc == 0
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["devices"], r["quant"], r["status"]) for r in rows] == [
        (spec, quant, "ok") for spec in ("cpu*1", "cpu*2") for quant in ("none", "w4a16")]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [(run["model"], run["quant"]) for run in runs] == [("synthetic:tiny", "none"),
                                                               ("synthetic:tiny@w4a16", "w4a16")] * 2
    profiled = runs[2]["decode"][0]["profile"]  # cpu*2, none
    assert len(profiled) == 2
    for rank, p in enumerate(profiled):
        assert len(p["steps"]) == 3 and p["decode"] == "eager"
        for step in p["steps"]:
            assert all(step[f"{c}_ms"] >= 0 for c in CLASSES), step
            assert sum(step[f"{c}_ms"] for c in CLASSES) == pytest.approx(step["step_ms"], rel=1e-6)
            assert step["gemm_ms"] > 0 and step["attention_ms"] > 0 and step["allreduce_ms"] > 0 and \
                step["small_ms"] > 0, step
        trace = gzip.decompress((out / "traces" / p["trace"]).read_bytes()).decode()
        assert p["trace"].endswith(f"rank{rank}.json.gz") and STEP_MARK in trace
    for dense, quantized in (runs[0:2], runs[2:4]):
        reads = {}
        for run in (dense, quantized):  # the planner's own plan for the run's budgets, in its quantization
            p = run["plan"]
            plan = plan_model(synthetic_config(run["model"]), [(r["device"], r["budget_bytes"]) for r in p["ranks"]],
                               max_context=p["max_context"], max_batch=p["max_batch"], dtype=p["dtype"],
                               split=p["split"])
            assert [r.read_bytes for r in plan.ranks] == [r["read_bytes"] for r in p["ranks"]]
            reads[run["quant"]] = (run["decode"][0]["read_bytes_per_step"], [r.read_bytes for r in plan.ranks])
        (dense_step, dense_weights), (quant_step, quant_weights) = reads["none"], reads["w4a16"]
        for rank in range(len(dense_step)):  # the same KV cache both ways: the weights make all the difference
            assert dense_step[rank] - quant_step[rank] == dense_weights[rank] - quant_weights[rank] > 0
    for dense, quantized in (rows[0:2], rows[2:4]):
        assert int(quantized["read_bytes_per_step"]) < int(dense["read_bytes_per_step"])
        assert float(quantized["roofline_tokens_per_s"]) > 0 and float(quantized["tokens_per_s"]) > 0
    summary = (out / "summary.md").read_text()
    assert "--quant none,w4a16" in summary.split("\n")[2]  # the command that reproduces the sweep
    table = summary.split("## Quantizations side by side")[1].split("##")[0]
    assert "| devices | ranks | backend | prompt | batch | none tokens/s | w4a16 tokens/s | w4a16 / none |" in table
    assert [line.split(" | ")[0] for line in table.splitlines() if "x fewer bytes read)" in line] == ["| `cpu*1`",
                                                                                              "| `cpu*2`"]
    for name, wanted in (("scaling.png", "{} measured"), ("prefill.png", "{}, prompt 8")):
        for quant in ("none", "w4a16"):
            assert wanted.format(f"{quant}, hoststaged, memory split") in labels[name], (name, labels[name])
    assert {"cpu*2 none hoststaged p8 b1", "cpu*2 w4a16 hoststaged p8 b1"} <= set(labels["breakdown.png"])
    table = summary.split("## Decode step profile")[1].split("##")[0]
    assert [line.split(" | ")[5] for line in table.splitlines() if line.startswith("| `cpu*2` | none |")] == ["0", "1"]


def test_rows_name_a_checkpoints_own_quantization_not_a_preset_it_does_not_match():
    from raytp.model.config import quant_name, quant_preset
    from raytp.model.quant.compressed_tensors import CompressedTensors

    assert quant_name(None) == "none" and quant_name(quant_preset("w4a16")) == "w4a16"
    own = CompressedTensors("int", 4, 128, ignore=("lm_head",))  # llmcompressor's W4A16 as a checkpoint states it
    assert quant_name(own) == own.describe() == "w4a16 int, groups of 128, symmetric"


# ---- --share-gpus, decided before any actor starts (in process: the cluster's resources stand in for Ray) --------

@pytest.mark.parametrize("gpus, share_gpus, ran, reason", [
    (0, True, ["cpu"], "ClusterError: needs 2 GPUs, the Ray cluster has 0"),  # nothing to share: no hint either
    (0, False, ["cpu"], "ClusterError: needs 2 GPUs, the Ray cluster has 0 (--share-gpus lets ranks share them)"),
    (1, True, ["cpu", "cuda*2"], None),
    (1, False, ["cpu"], "ClusterError: needs 2 GPUs, the Ray cluster has 1 (--share-gpus lets ranks share them)"),
])
def test_share_gpus_runs_more_cuda_ranks_than_gpus_and_leaves_cpu_ranks_alone(monkeypatch, gpus, share_gpus, ran,
                                                                               reason):
    """A sweep over a cpu and a cuda*2 set: the cpu set always runs; the cuda set runs on fewer GPUs only with
    --share-gpus, and on a cluster without GPUs is skipped (not failed) whatever the flag, at once."""
    import ray

    from raytp.bench import sweep
    from raytp.parallel.devices import parse_devices

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": float(gpus)})
    started = []
    monkeypatch.setattr(sweep, "run_bench", lambda settings, *args, **kwargs: started.append(settings) or
                        {"plan": {"split": "memory"}})
    device_sets = tuple((spec, parse_devices(spec)) for spec in ("cpu", "cuda*2"))
    result = sweep.run_sweep(sweep.Sweep(models=("synthetic:tiny",), device_sets=device_sets, comms=("hoststaged",),
                                         batches=(1,), prompt_lens=(8,), share_gpus=share_gpus))
    assert [o["devices"] for o in result["outcomes"] if o["status"] == "ok"] == ran
    assert [tuple(s.devices) for s in started] == [tuple(parse_devices(s)) for s in ran]
    skipped = [o for o in result["outcomes"] if o["status"] != "ok"]
    assert [(o["devices"], o["status"], o["reason"]) for o in skipped] == ([] if reason is None else
                                                                           [("cuda*2", "skipped", reason)])


@pytest.mark.parametrize("ranks, gpus, share", [(3, 2, 0.5), (4, 1, 0.25), (2, 2, 1), (2, 0, 1)])
def test_cuda_ranks_beyond_the_gpus_are_packed_onto_them(monkeypatch, ranks, gpus, share):
    """What a shared GPU gives each rank: 1/k of it for k ranks per GPU; a whole one where every rank has its own,
    or where the cluster has none (Ray then refuses the cuda ranks by name, raytp.actors.group._check_resources)."""
    import ray

    from raytp.actors.group import GroupSettings, WorkerGroup
    from raytp.parallel.devices import parse_devices

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": float(gpus)})
    group = WorkerGroup(GroupSettings(model="synthetic:tiny", devices=parse_devices(f"cuda*{ranks}")), config=None)
    assert group._gpu_share() == share
