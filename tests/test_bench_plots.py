"""The bench plots' layout and names, from rows made here (no sweep, no Ray): the axis names the kind of rank, a
legend names the backend `--comm auto` chose, and the breakdown's legend covers no bar."""

from __future__ import annotations

import matplotlib
import pytest

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from raytp.bench import report  # noqa: E402


def row(devices: str, ranks: int, comm: str = "auto", backend: str = "hoststaged") -> dict:
    return {"devices": devices, "ranks": ranks, "quant": "none", "comm": comm, "split": None, "backend": backend,
            "prompt_len": 8, "batch": 1, "tokens_per_s": 10.0 * ranks, "ideal_tokens_per_s": 10.0 * ranks,
            "roofline_tokens_per_s": 20.0 * ranks, "hf_tokens_per_s": None, "compute_ms": 1.0, "allreduce_ms": 0.5,
            "overhead_ms": 0.2 * ranks, "ms_per_token": 1.5 + 0.2 * ranks, "prefill_tokens_per_s": 100.0 * ranks}


@pytest.fixture
def saved(monkeypatch) -> list:
    """Every figure the report saves, in order."""
    figures = []
    savefig = matplotlib.figure.Figure.savefig

    def recording(fig, path, *args, **kwargs):
        figures.append(fig)
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording)
    return figures


@pytest.mark.parametrize("n", [1, 3, 8])
def test_the_breakdown_legend_covers_no_bar(saved, tmp_path, n):
    report._plot_breakdown(plt, tmp_path / "breakdown.png", [row(f"cpu*{i + 1}", i + 1) for i in range(n)])
    fig = saved[-1]
    renderer = fig.canvas.get_renderer()
    legend = fig.axes[0].get_legend().get_window_extent(renderer)
    assert fig.bbox.contains(legend.x0, legend.y0) and fig.bbox.contains(legend.x1 - 1, legend.y1 - 1)
    bars = [p.get_window_extent(renderer) for p in fig.axes[0].patches]
    assert len(bars) == 3 * n and not any(legend.overlaps(b) for b in bars)


@pytest.mark.parametrize("specs, axis", [(["cpu*1", "cpu@1GiB,cpu@1GiB"], "cpu ranks"),
                                         (["cuda*1", "cuda:0,cuda:1"], "ranks (GPUs)"),
                                         (["cpu*1", "cuda:0,cuda:1"], "ranks")])
def test_plots_over_ranks_name_their_kind_and_the_backend_that_ran(saved, tmp_path, specs, axis):
    rows = [row(spec, i + 1) for i, spec in enumerate(specs)]
    report._plot_scaling(plt, tmp_path / "scaling.png", rows)
    report._plot_prefill(plt, tmp_path / "prefill.png", rows)
    for fig in saved:
        assert fig.axes[0].get_xlabel() == axis
        names = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert names and all("auto: hoststaged" in name for name in names), names


def test_a_backend_asked_for_is_named_as_asked(saved, tmp_path):
    rows = [row("cpu*1", 1, "gloo", "gloo"), row("cpu*2", 2, "gloo", "gloo")]
    report._plot_scaling(plt, tmp_path / "scaling.png", rows)
    assert [t.get_text() for t in saved[-1].axes[0].get_legend().get_texts()][0] == "none, gloo measured"
