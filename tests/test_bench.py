"""`raytp bench` end to end on two CPU ranks: the JSON has every figure, and every figure is positive."""

from __future__ import annotations

import json

from raytp.cli import main


def test_bench_smollm2_on_two_cpu_ranks(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(smollm2_dir), "--devices", "cpu*2", "--dtype", "float32", "--batch", "1,2",
               "--prompt-len", "8", "--decode-tokens", "6", "--repeats", "1", "--allreduce-sizes", "576,4096",
               "--allreduce-iters", "5", "--comm", "hoststaged", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["backend"] == "hoststaged" and res["devices"] == ["cpu", "cpu"]
    assert len(res["bandwidth_bytes_per_s"]) == 2 and min(res["bandwidth_bytes_per_s"]) > 0
    assert set(res["allreduce_us"]["rank0"]) == {"576", "4096"}
    assert min(res["allreduce_us"]["slowest_rank"].values()) > 0
    assert [d["batch"] for d in res["decode"]] == [1, 2]
    for d in res["decode"]:
        assert d["steps_timed"][0] >= 3  # whole-batch steps only: 6 tokens give 5 decode steps
        for key in ("ms_per_step", "tokens_per_s", "roofline_ms", "roofline_fraction"):
            assert d[key] > 0, key
        assert len(d["greedy_tokens"]) == 6
    # the same first prompt, greedy: batching must not change its tokens
    assert res["decode"][0]["greedy_tokens"] == res["decode"][1]["greedy_tokens"]
    assert "of roofline" in capsys.readouterr().out
