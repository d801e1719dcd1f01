import pytest
from hypothesis import given
from hypothesis import strategies as st

from raytp.parallel.devices import DeviceSpec, DeviceSpecError, format_bytes, is_auto, parse_bytes, parse_devices

GiB, MiB = 2**30, 2**20


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("cpu@3GiB,cpu@2GiB,cpu@1GiB",
         [DeviceSpec("cpu", None, 3 * GiB), DeviceSpec("cpu", None, 2 * GiB), DeviceSpec("cpu", None, GiB)]),
        ("cpu*4", [DeviceSpec("cpu", None, None)] * 4),
        ("cuda*4", [DeviceSpec("cuda", None, None)] * 4),
        ("cuda:0@24GiB,cuda:1@80GiB", [DeviceSpec("cuda", 0, 24 * GiB), DeviceSpec("cuda", 1, 80 * GiB)]),
        ("cuda*2@40GiB", [DeviceSpec("cuda", None, 40 * GiB)] * 2),
        (" cuda:3 @ 1.5 GiB ,\tcpu@512MiB, CPU@2GB ", [DeviceSpec("cuda", 3, 3 * GiB // 2),
                                                        DeviceSpec("cpu", None, 512 * MiB),
                                                        DeviceSpec("cpu", None, 2 * 10**9)]),
        ("cpu@800MB,cuda:0,cpu*2@4096B", [DeviceSpec("cpu", None, 800 * 10**6), DeviceSpec("cuda", 0, None),
                                          DeviceSpec("cpu", None, 4096), DeviceSpec("cpu", None, 4096)]),
        ("cuda:0@24GiB~0.94TB/s,cuda:1~936GB/s,cpu*2~20000MB/s",
         [DeviceSpec("cuda", 0, 24 * GiB, 0.94e12), DeviceSpec("cuda", 1, None, 936e9),
          DeviceSpec("cpu", None, None, 20e9), DeviceSpec("cpu", None, None, 20e9)]),
    ],
)
def test_parse_examples(spec, expected):
    assert parse_devices(spec) == expected


def test_str_and_name():
    assert str(DeviceSpec("cuda", 1, 24 * GiB)) == "cuda:1@24GiB"
    assert str(DeviceSpec("cpu", None, 3 * GiB)) == "cpu@3GiB"
    assert str(DeviceSpec("cpu", None, 3 * GiB // 2)) == "cpu@1.5GiB"
    assert str(DeviceSpec("cpu", None, 800 * 10**6)) == "cpu@800MB"
    assert str(DeviceSpec("cuda", None, None)) == "cuda"
    assert DeviceSpec("cuda", 1, None).name == "cuda:1"
    assert DeviceSpec("cpu", None, GiB).name == "cpu"
    assert str(DeviceSpec("cuda", 0, 24 * GiB, 0.94e12)) == "cuda:0@24GiB~940GB/s"


@pytest.mark.parametrize("spec", ["cuda~fast", "cuda@1GiB~0TB/s", "cuda~1TB", "cuda~-1GB/s"])
def test_bad_bandwidth_names_the_item_and_the_units(spec):
    with pytest.raises(DeviceSpecError, match=r"bad bandwidth .*TB/s, GB/s or MB/s"):
        parse_devices(spec)


@given(
    st.lists(
        st.tuples(st.sampled_from(["cpu", "cuda"]), st.booleans(),
                  st.one_of(st.none(), st.integers(1, 2**45))),
        min_size=1, max_size=8,
    )
)
def test_str_parses_back(items):
    # explicit cuda indexes must be distinct, so number them by position
    specs = [DeviceSpec(kind, i if kind == "cuda" and indexed else None, mem)
             for i, (kind, indexed, mem) in enumerate(items)]
    assert parse_devices(",".join(map(str, specs))) == specs


@pytest.mark.parametrize(
    "spec, bad_item, why",
    [
        ("cpu*0", "cpu*0", "count must be in 1.."),
        ("gpu:0@3GiB", "gpu:0@3GiB", "unknown kind 'gpu'"),
        ("cuda:0@8GiB,cuda:1,cuda:0", "cuda:0", "listed twice"),
        ("cpu@0GiB", "cpu@0GiB", "positive"),
        ("cpu@-1GiB", "cpu@-1GiB", "positive"),
        ("cpu@0.1B", "cpu@0.1B", "positive"),
        ("cpu@24", "cpu@24", "unit"),
        ("cpu@3XB", "cpu@3XB", "unit"),
        ("cpu@", "cpu@", "not of the form"),
        ("cpu:1", "cpu:1", "cpu takes no index"),
        ("cuda:0*2", "cuda:0*2", "not of the form"),
        ("cuda*-1", "cuda*-1", "not of the form"),
        ("cpu,,cpu", "", "empty item"),
        ("cpu@1GiB,", "", "empty item"),
    ],
)
def test_malformed_specs_name_the_item_and_the_syntax(spec, bad_item, why):
    with pytest.raises(DeviceSpecError) as info:
        parse_devices(spec)
    message = str(info.value)
    assert f"bad device {bad_item!r}" in message
    assert why in message
    assert "KIND[:INDEX][@MEM]" in message and "KIND*COUNT[@MEM]" in message
    assert "e.g. 'cuda:0@24GiB,cuda:1@80GiB'" in message


@pytest.mark.parametrize("spec", ["", "  ", "auto", " AUTO "])
def test_empty_and_auto_are_not_parsed(spec):
    with pytest.raises(DeviceSpecError):
        parse_devices(spec)


def test_is_auto():
    assert is_auto("auto") and is_auto(" Auto ")
    assert not is_auto("cuda*2") and not is_auto("auto,cpu")


@pytest.mark.parametrize(
    "text, n",
    [("512MiB", 512 * MiB), ("3GiB", 3 * GiB), ("1.5GiB", 3 * GiB // 2), ("2GB", 2 * 10**9), ("800MB", 8 * 10**8),
     ("4096B", 4096), ("1TiB", 2**40), ("64KiB", 65536), ("10kb", 10_000), (" 2 gib ", 2 * GiB), (".5GiB", GiB // 2)],
)
def test_parse_bytes(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "GiB", "3", "3 GiBs", "1.2.3GiB", "3Gb/s"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="expected a number and a unit"):
        parse_bytes(text)


@pytest.mark.parametrize(
    "n, text",
    [(3 * GiB, "3.00 GiB"), (512 * MiB, "512.0 MiB"), (1536 * MiB, "1.50 GiB"), (12, "12 B"), (2048, "2.0 KiB"),
     (2**41, "2.00 TiB"), (-GiB, "-1.00 GiB")],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text
