"""The benchmarks' bookkeeping (not their timings): one tiny case each, run in process."""

from __future__ import annotations

import pytest
import torch
from conftest import native_buildable

pytest.importorskip("torchvision")


def test_step_bench_case_reports_ratios_and_saved_bytes():
    from gradfilter.bench.step import METHODS, _line, bench_case

    row = bench_case("mobilenet_v2", 2, 4, batch=2, size=64, repeats=1,
                     device=torch.device("cpu"))
    assert row["blocks"] == ["features.17", "features.18"]
    for m in METHODS:
        assert row[f"step_ms_{m}"] > 0
        phases = [row[f"{p}_ms_{m}"] for p in ("forward", "backward", "optimizer")]
        assert min(phases) > 0 and sum(phases) == pytest.approx(row[f"step_ms_{m}"], rel=0.5)
    assert row["forward_only_ms"] > 0
    # each method's parameter flush: its choice, and at least the warm-up's probe
    assert set(row["flush"]) == set(METHODS) == set(row["flush_probes"])
    if native_buildable():  # without the kernels the flush turns itself off before probing
        assert all(n >= 1 for n in row["flush_probes"].values())
    # the zero-backward bound: vanilla's own step minus its backward, over E's denominator
    no_backward = row["forward_ms_vanilla"] + row["optimizer_ms_vanilla"]
    window = row["step_ms_vanilla"] - row["forward_only_ms"]
    expect = (row["step_ms_vanilla"] - no_backward) / window if window > 0 else None
    assert row["efficiency_bound"] == pytest.approx(expect)
    for m in METHODS[1:]:
        assert row[f"speedup_{m}"] == pytest.approx(row["step_ms_vanilla"] / row[f"step_ms_{m}"])
        paired = row[f"efficiency_paired_{m}"]
        if paired is not None:
            lo, hi = row[f"efficiency_iqr_{m}"]
            assert lo <= paired <= hi
    # what the blocks save: filtering alone shrinks the convs' inputs only; lean much more
    assert row["saved_bytes_blocks_vanilla"] > row["saved_bytes_blocks_filtered"] \
        > row["saved_bytes_blocks_lean"] > 0
    assert row["saved_bytes_vanilla"] >= row["saved_bytes_blocks_vanilla"]
    # the VM state that slows passes over data the other core wrote: read before and after
    if torch.get_num_threads() > 1:
        assert len(row["cross_core_read_ratio"]) == 2 and min(row["cross_core_read_ratio"]) > 0
    for ratio, flagged in (([2.0, 1.0], True), ([1.0, 1.1], False)):
        row["cross_core_read_ratio"] = ratio
        assert ("split caches" in _line(row)) is flagged


def test_cross_core_read_ratio_needs_two_threads_and_restores_the_count():
    from gradfilter.machine import cross_core_read_ratio

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cross_core_read_ratio() is None
        torch.set_num_threads(2)
        assert cross_core_read_ratio(mib=1, repeats=3) > 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_paired_efficiency_cancels_load_that_changes_between_rounds():
    from gradfilter.bench.step import paired_efficiency

    # every round: vanilla 100, method 90, forward-only 80 (E = 50%), all scaled by that
    # round's machine speed (a machine twice as slow from the third round on)
    speed = [1.0, 1.0, 2.0, 2.0, 2.0]
    v, m, f = ([t * k for k in speed] for t in (100, 90, 80))
    assert paired_efficiency(v, m, f) == pytest.approx((0.5, 0.5, 0.5))
    # bursts within rounds 2 and 4 hit vanilla alone: E there reads 67% and 71%
    noisy = [100.0, 110.0, 200.0, 230.0, 200.0]
    median, lo, hi = paired_efficiency(noisy, m, f)
    assert median == pytest.approx(0.5) and lo == pytest.approx(0.5)
    assert hi == pytest.approx(2 / 3)  # the spread shows the noise
    assert paired_efficiency([1.0], [0.5], [2.0]) is None  # no positive window: no E


def test_step_bench_case_channels_last_saves_the_same_bytes():
    """--channels-last changes the layout, not what autograd keeps for backward."""
    from gradfilter.bench.step import bench_case

    rows = [bench_case("mobilenet_v2", 2, 4, batch=2, size=64, repeats=1,
                       device=torch.device("cpu"), channels_last=cl) for cl in (False, True)]
    assert [r["channels_last"] for r in rows] == [False, True]
    for key in ("saved_bytes_blocks_vanilla", "saved_bytes_blocks_filtered",
                "saved_bytes_blocks_lean"):
        assert rows[0][key] == rows[1][key] > 0


def test_layer_bench_config_times_both_methods():
    from gradfilter.bench.layers import bench_config

    row = bench_config(8, 12, 12, radius=2, batch=2, repeats=1, device=torch.device("cpu"))
    assert row["backward_speedup"] == pytest.approx(
        row["backward_vanilla_ms"] / row["backward_filtered_ms"])


def test_machine_info_records_allocator_and_kernels(monkeypatch):
    from gradfilter.machine import describe, machine_info

    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    info = machine_info("cpu")
    assert info["allocator"].startswith("tuned") and isinstance(info["native_kernels"], bool)
    assert "allocator tuned" in describe(info)
    monkeypatch.delenv("MALLOC_MMAP_MAX_")
    monkeypatch.setitem(__import__("gradfilter.allocator").allocator._state, "tuned", False)
    assert machine_info("cpu")["allocator"] == "default"


def test_machine_info_records_the_cpu_generation(tmp_path, monkeypatch):
    """Family/model numbers and AVX-512 come from /proc/cpuinfo's first processor entry."""
    import builtins

    from gradfilter import machine

    fake = tmp_path / "cpuinfo"
    fake.write_text("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
                    "flags\t\t: fpu sse2 avx2 avx512f avx512bw\n\nprocessor\t: 1\n"
                    "cpu family\t: 99\nmodel\t\t: 1\nflags\t\t: fpu\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(
        fake if path == "/proc/cpuinfo" else path, *a, **k))
    info = machine.machine_info("cpu")
    assert info["cpu_id"] == "family 25 model 17" and info["avx512"] is True
    assert "[family 25 model 17, AVX-512]" in machine.describe(info)
    fake.write_text("cpu family\t: 26\nmodel\t\t: 2\nflags\t\t: fpu avx2\n")
    info = machine.machine_info("cpu")
    assert info["cpu_id"] == "family 26 model 2" and info["avx512"] is False
    assert "AVX-512" not in machine.describe(info)


def test_cli_allocator_flag_is_parsed_and_validated(capsys):
    import pytest

    from gradfilter.cli import build_parser

    assert build_parser().parse_args(["--allocator", "default", "demo"]).allocator == "default"
    assert build_parser().parse_args(["demo"]).allocator == "tuned"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--allocator", "jemalloc", "demo"])
    assert "invalid choice: 'jemalloc'" in capsys.readouterr().err


def test_every_method_keeps_the_plain_classifier():
    """A fair baseline: bench step gives no method a speed-up vanilla could have too (the
    classifier stays nn.Linear everywhere); only the filtered methods convert convs."""
    from torch import nn

    from gradfilter import FilteredConv2d
    from gradfilter.bench import step

    x = torch.randn(2, 3, 64, 64)
    for m in step.METHODS:
        net = step.build("mobilenet_v2", m, 2, 4, x)[0]
        assert type(net.classifier[1]) is nn.Linear, m
        filtered = any(isinstance(c, FilteredConv2d) for c in net.modules())
        assert filtered == (m != "vanilla"), m


def test_step_bench_compiled_variants_are_measured_against_compiled_vanilla():
    """--compile: every method also compiled, its E and speed-up taken against the compiled
    vanilla step and compiled forward-only time (the baseline a user who compiles picks)."""
    from gradfilter.bench.step import COMPILED, _line, bench_case

    with pytest.raises(ValueError, match="unknown method.*fast"):
        bench_case("mobilenet_v2", 1, 4, batch=2, size=32, repeats=1,
                   device=torch.device("cpu"), methods=("fast",))
    row = bench_case("mobilenet_v2", 1, 4, batch=2, size=32, repeats=1,
                     device=torch.device("cpu"), compile="aot_eager", methods=("fused",))
    assert row["methods"] == ["vanilla", "fused"]
    assert "step_ms_filtered" not in row and f"step_ms_filtered{COMPILED}" not in row
    cv, cf = row[f"step_ms_vanilla{COMPILED}"], row[f"forward_only{COMPILED}_ms"]
    assert cv > 0 and cf > 0
    for m in ["fused"]:
        c = f"{m}{COMPILED}"
        assert row[f"speedup_{c}"] == pytest.approx(cv / row[f"step_ms_{c}"])
        if cv > cf:
            assert row[f"efficiency_{c}"] == pytest.approx((cv - row[f"step_ms_{c}"]) / (cv - cf))
        assert row[f"vs_eager_{c}"] == pytest.approx(row[f"step_ms_{m}"] / row[f"step_ms_{c}"])
        # eager methods keep the eager baseline
        assert row[f"speedup_{m}"] == pytest.approx(row["step_ms_vanilla"] / row[f"step_ms_{m}"])
    assert f"fused{COMPILED}" in _line(row)


def test_cpu_load_spins_processes_while_the_block_runs_and_stops_them():
    import time

    from gradfilter.machine import cpu_load

    with pytest.raises(ValueError, match="load processes"):
        with cpu_load(-1):
            pass
    t0 = time.process_time()
    with cpu_load(1):
        import multiprocessing

        procs = multiprocessing.active_children()
        assert len(procs) >= 1 and all(p.is_alive() for p in procs)
        time.sleep(0.5)
    assert not any(p.is_alive() for p in procs)
    assert time.process_time() - t0 < 0.5  # the spinning happened in the children
