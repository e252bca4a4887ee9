"""Every number on screen has a unit, and what is unknown says n/a."""

from __future__ import annotations

import pytest

from tui import format as fmt


@pytest.mark.parametrize(
    ("func", "value", "expected"),
    [
        (fmt.pct, None, "n/a"),
        (fmt.pct, 47.4, "47%"),
        (fmt.gib, 80 * 2**30, "80.0 GiB"),
        (fmt.watts, 480.4, "480 W"),
        (fmt.gbps, 1575.2, "1,575 GB/s"),
        (fmt.gbps, 3.25, "3.2 GB/s"),
        (fmt.rate_bytes, 1.5e9, "1.5 GB/s"),
        (fmt.rate_bytes, 2.5e6, "2.5 MB/s"),
        (fmt.rate_bytes, 12, "12 B/s"),
        (fmt.joules, 12_300, "12.3 kJ"),
        (fmt.joules, 7.2e6, "2.00 kWh"),
        (fmt.celsius, 61.6, "62°C"),
        (fmt.mhz, 1980, "1,980 MHz"),
        (fmt.seconds, 0.2104, "210 ms"),
        (fmt.seconds, 1.5, "1.50 s"),
        (fmt.vram_short, 512 * 2**20, "512 MiB"),
        (fmt.vram_short, 70 * 2**30, "70.0 GiB"),
        (fmt.tokens_per_s, 5210.4, "5,210 tok/s"),
    ],
)
def test_units(func, value, expected) -> None:  # type: ignore[no-untyped-def]
    assert func(value) == expected


def test_sparkline_uses_a_fixed_scale_and_keeps_gaps() -> None:
    line = fmt.sparkline([0.0, 50.0, 100.0, None], 4, hi=100.0)
    assert line == "▁▄█ "
    # A window of small values stays small on a fixed 0-100 scale.
    assert set(fmt.sparkline([10.0, 12.0], 2, hi=100.0)) <= set("▁▂")


def test_sparkline_pads_on_the_left_and_takes_the_newest_values() -> None:
    assert fmt.sparkline([100.0], 3, hi=100.0) == "  █"
    assert fmt.sparkline([0.0, 0.0, 100.0, 100.0], 2, hi=100.0) == "██"


def test_bar() -> None:
    assert fmt.bar(0.5, 4) == "██  "
    assert fmt.bar(None, 3) == "···"
    assert fmt.bar(1.7, 2) == "██"


def test_downsample_averages_groups_with_the_partial_group_oldest() -> None:
    assert fmt.downsample([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 2.5, 4.5]
    assert fmt.downsample([None, None, 4.0, None], 2) == [None, 4.0]


def test_sparkline_cells_cover_several_readings() -> None:
    # 8 readings, 2 per cell, 4 cells: 0,0 | 100,100 | 0,100 | None,None
    assert fmt.sparkline([0.0, 0.0, 100.0, 100.0, 0.0, 100.0, None, None], 4, hi=100.0, per_cell=2) == "▁█▄ "


def test_a_percentage_of_zeros_is_the_lowest_block() -> None:
    assert fmt.pct_sparkline([0.0] * 12, 6) == "▁" * 6
    # Not auto-ranged either where no scale is given: all zeros are still zeros.
    assert fmt.sparkline([0.0] * 6, 6) == "▁" * 6


def test_fifty_percent_is_half_height_whatever_the_other_gpus_show() -> None:
    idle, busy = [0.0] * 8, [50.0] * 8
    assert fmt.pct_sparkline(busy, 8) == "▄" * 8
    assert fmt.pct_sparkline(idle, 8) == "▁" * 8  # drawn beside it: its own range does not stretch it
    # A small percentage stays small on its own (it would fill the cell if scaled to its window).
    assert fmt.pct_sparkline([2.0, 3.0, 2.5], 3) == "▁▁▁"
    # A cell's height is its value in eighths of the scale.
    assert fmt.pct_sparkline([12.5, 25.0, 37.5, 62.5, 75.0, 87.5, 100.0, 140.0], 8) == "▁▂▃▅▆▇██"


def test_power_is_drawn_on_its_limit() -> None:
    assert fmt.sparkline([350.0, 700.0, 0.0], 3, hi=700.0) == "▄█▁"
