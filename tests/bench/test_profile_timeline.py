"""bench/profile_decode.py's timeline: kernel time counted past the previous kernel's end, so
kernels placed early by programmatic dependent launch are not counted twice."""

from __future__ import annotations

from bench.profile_decode import KernelSpan, timeline_report


def test_serial_kernels_count_their_durations_and_the_gaps_between() -> None:
    spans = [KernelSpan("a", 0, 10), KernelSpan("b", 12, 20), KernelSpan("a", 21, 31)]
    lines = timeline_report(spans, steps=1)
    assert lines[0] == (
        "timeline: 3 kernels a step, 0.028 ms of kernel time in 0.031 ms of span (0.003 ms between kernels)"
    )
    assert lines[2].split() == [
        "0.020",
        "ms",
        "2.0x",
        "10.00",
        "us",
        "+0.50",
        "us",
        "a",
    ]  # gaps 0 and 1: median 0.5
    assert lines[3].split() == ["0.008", "ms", "1.0x", "8.00", "us", "+2.00", "us", "b"]


def test_a_kernel_placed_before_its_predecessor_ends_counts_only_what_runs_after() -> None:
    # "b" started (waiting) at 5 while "a" ran to 10, then finished at 14: it added 4 us.
    spans = [KernelSpan("b", 5, 14), KernelSpan("a", 0, 10), KernelSpan("c", 14, 15)]
    lines = timeline_report(spans, steps=1)
    assert "0.015 ms of kernel time in 0.015 ms of span (0.000 ms between kernels)" in lines[0]
    times = {line.split()[-1]: float(line.split()[3]) for line in lines[2:5]}
    assert times == {"a": 10.0, "b": 4.0, "c": 1.0}
    assert [line.split() for line in lines[-2:]] == [
        ["+0.00", "us", "4.00", "us", "b"],
        ["+0.00", "us", "1.00", "us", "c"],
    ]


def test_nothing_profiled_reports_nothing() -> None:
    assert timeline_report([], steps=5) == []
