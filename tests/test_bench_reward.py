"""`alignloop bench reward` ends with the one JSON line every benchmark prints."""

from alignloop.rewards.bench import run_bench


def test_bench_reward_reports_ours_peer_unit_ratio():
    import torch

    before = torch.get_num_threads()
    line = run_bench(n=8, batch=8, threads=1)
    assert torch.get_num_threads() == before  # later tests compare runs across processes
    assert line["bench"] == "reward" and line["unit"] == "responses/s"
    assert line["ours"] > 0 and line["peer"] > 0
    assert abs(line["ratio"] - line["ours"] / line["peer"]) < 0.01
