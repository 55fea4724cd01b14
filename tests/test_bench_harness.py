"""The shared bench rules: fixed threads, warm-up then alternating rounds, median/min/max, one headline."""

from __future__ import annotations

import os

import pytest
import torch

from alignloop.bench import harness


def test_threads_default_to_every_core_this_process_may_use_never_the_load(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))  # a loaded start must not change it
    assert harness.bench_threads(None) == len(os.sched_getaffinity(0))
    assert harness.bench_threads(3) == 3


def test_fixed_threads_sets_and_restores_torch_threads():
    before = torch.get_num_threads()
    with harness.fixed_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_every_configuration_is_warmed_up_then_rounds_alternate():
    calls = []

    def config(name):
        def run():
            calls.append(name)
            return {"useful": 10, "seconds": 2.0}
        return run

    out = harness.alternate_rounds({"ours": config("ours"), "peer": config("peer"), "peer2": config("peer2")},
                                   rounds=4)
    warm, timed = calls[:3], calls[3:]
    assert warm == ["ours", "peer", "peer2"]
    assert timed == ["ours", "peer", "peer2", "peer2", "peer", "ours", "ours", "peer", "peer2",
                     "peer2", "peer", "ours"]
    assert {k: len(v) for k, v in out.items()} == {"ours": 4, "peer": 4, "peer2": 4}


def test_fewer_than_three_rounds_is_refused():
    with pytest.raises(ValueError, match="at least 3 rounds"):
        harness.alternate_rounds({"ours": lambda: {"useful": 1, "seconds": 1}}, rounds=2)


def test_seconds_are_measured_when_the_callable_does_not_say():
    out = harness.alternate_rounds({"ours": lambda: {"useful": 1}}, rounds=3, warmup=False)
    assert all(r["seconds"] > 0 for r in out["ours"])


def test_summary_and_headline_report_medians_with_min_and_max():
    ours = harness.summary([{"useful": 100, "seconds": s} for s in (1.0, 2.0, 4.0)])
    peer = harness.summary([{"useful": 100, "seconds": s} for s in (2.0, 2.0, 8.0)])
    assert ours == {"median": 50.0, "min": 25.0, "max": 100.0, "rounds": 3}
    line = harness.headline("x", ours, peer, "tokens/s", ours_config="a", peer_config="b",
                            machine=harness.machine_facts(2), extra_fact=1)
    assert list(line)[:5] == ["bench", "ours", "peer", "unit", "ratio"]
    assert line["ratio"] == 1.0 and line["ours_min_max"] == [25.0, 100.0] and line["peer_min_max"] == [12.5, 50.0]
    assert line["extra_fact"] == 1 and line["machine"]["threads"] == 2


def test_machine_facts_read_the_isa_off_the_cpu_flags():
    assert harness.isa({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}) == "amx_bf16"
    assert harness.isa({"avx512f", "avx512_bf16"}) == "avx512_bf16"
    assert harness.isa({"avx2"}) == "avx2"
    assert harness.has_amx({"amx_bf16", "amx_tile"}) and not harness.has_amx({"avx512_bf16"})
    facts = harness.machine_facts(1, peers=("transformers",))
    assert {"cpu", "isa", "amx", "cores", "threads", "torch", "versions", "native_kernels"} <= set(facts)
    assert facts["versions"]["transformers"]
    assert facts["native_kernels"] in ("on", "not used") or facts["native_kernels"].startswith("off: ")
