"""Where the GPU host-staged kernel puts each rank's data and flags (the layout is plain arithmetic: no GPU needed).

The kernel computes the same offsets in CUDA; tests/gpu/test_hoststaged_kernel.py checks that it writes where
this layout says."""

import pytest

from raytp.kernels.hoststaged_allreduce import LINE, VECTOR, SegmentLayout


@pytest.mark.parametrize("world", [1, 3, 16])
@pytest.mark.parametrize("chunk_bytes", [256, 2048])  # 256: 16 threads, one per rank
@pytest.mark.parametrize("max_bytes", [2, 5000, 1 << 17])
def test_cells_and_flags_are_disjoint_aligned_and_inside_the_segment(world, chunk_bytes, max_bytes):
    layout = SegmentLayout(world, max_bytes, chunk_bytes)
    assert layout.chunks * chunk_bytes >= max_bytes  # the largest message fits
    spans = [(0, 4)]  # the error word
    for rank in range(world):
        for bank in (0, 1):
            for chunk in range(layout.chunks):
                data = layout.cell(rank, bank, chunk)
                flag = data + chunk_bytes
                assert data % VECTOR == 0 and flag % LINE == 0  # 16-byte vectors; a flag owns its line
                spans += [(data, data + chunk_bytes), (flag, flag + LINE)]
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start
    assert spans[-1][1] <= layout.size


def test_each_rank_writes_one_contiguous_region_of_its_own():
    layout = SegmentLayout(4, 10_000, 1024)
    regions = [(layout.cell(r, 0, 0), layout.cell(r, 1, layout.chunks - 1) + layout.cell_bytes) for r in range(4)]
    assert [end - start for start, end in regions] == [2 * layout.chunks * layout.cell_bytes] * 4
    assert all(a_end == b_start for (_, a_end), (b_start, _) in zip(regions, regions[1:]))


def test_bad_layouts_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"200 ranks need chunk_bytes >= 3200, not 2048"):
        SegmentLayout(200, 1 << 20, 2048)
    with pytest.raises(ValueError, match=r"chunk_bytes=1000: use a multiple of 64"):
        SegmentLayout(2, 1 << 20, 1000)
