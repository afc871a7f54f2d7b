"""finetune.units: the strings pages, the CLI, plan reasons and dataset messages show for bytes and durations."""
import pytest

from finetune.units import format_bytes, format_duration


@pytest.mark.parametrize(("n", "shown"), [
    (0, "0 B"),
    (1, "1 B"),
    (1023, "1023 B"),
    (1024, "1.0 KiB"),
    (1536, "1.5 KiB"),
    (5 * 2**20, "5.0 MiB"),
    (3 * 2**30, "3.0 GiB"),
    (int(2.5 * 2**30), "2.5 GiB"),
    (2**40, "1.0 TiB"),
    (3 * 2**50, "3072.0 TiB"),  # nothing past TiB
    (-2048, "-2.0 KiB"),
    ("4096", "4.0 KiB"),  # a template may hand over a string
])
def test_bytes_pick_the_largest_unit_below_1024(n, shown):
    assert format_bytes(n) == shown


def test_bytes_missing_or_not_a_number():
    assert format_bytes(None) == "-"
    assert format_bytes("n/a", missing="–") == "–"
    assert format_bytes(float("nan"), missing="?") == "?"
    assert format_bytes(True) == "-"


def test_bytes_in_a_fixed_unit_or_from_a_larger_one():
    assert format_bytes(2**31, unit="GiB", digits=2) == "2.00 GiB"
    assert format_bytes(2**29, unit="GiB", digits=2) == "0.50 GiB"
    assert format_bytes(2**29, smallest="MiB") == "512.0 MiB"
    assert format_bytes(2**20 // 2, smallest="MiB") == "0.5 MiB"
    assert format_bytes(int(73.7 * 2**30), smallest="MiB") == "73.7 GiB"


def test_bytes_in_a_sentence_may_say_bytes():
    assert format_bytes(1000, byte_word="bytes") == "1000 bytes"
    assert format_bytes(5000, byte_word="bytes") == "4.9 KiB"  # the dataset row-size message


@pytest.mark.parametrize(("seconds", "shown"), [
    (0, "0s"),
    (3, "3s"),
    (59.4, "59s"),
    (60, "1m 00s"),
    (245, "4m 05s"),
    (3599, "59m 59s"),
    (7380, "2h 03m"),
    (86399, "23h 59m"),
    (3 * 86400 + 4 * 3600, "3d 4h"),
    (-5, "0s"),  # clock skew between machines
])
def test_exact_durations(seconds, shown):
    assert format_duration(seconds) == shown


@pytest.mark.parametrize(("seconds", "shown"), [
    (45, "45 s"),
    (89, "89 s"),
    (90, "2 min"),
    (19 * 60, "19 min"),
    (5399, "90 min"),
    (5400, "1.5 h"),
    (36000, "10.0 h"),
])
def test_approximate_durations(seconds, shown):
    assert format_duration(seconds, approximate=True) == shown


def test_durations_missing():
    assert format_duration(None) == ""
    assert format_duration(None, missing="-") == "-"
    assert format_duration(float("nan"), approximate=True, missing="?") == "?"
    assert format_duration("soon") == ""
