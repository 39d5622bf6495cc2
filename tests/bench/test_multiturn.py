"""The multi-turn benchmark's report: cache hits of turns 2+, TTFT percentiles, throughput and the ratios between the
two routers, from per-turn records (the run itself starts two 2 x ep 2 servers: a benchmark, not a test)."""
from bench.multiturn import Turn, ratios, summarize


def turn(conv, t, ttft, prompt, cached, status="200"):
    return Turn(conv, t, status=status, ttft=ttft, e2e=ttft + 1.0, prompt_tokens=prompt, cached_tokens=cached,
                output_tokens=10)


def test_summary_counts_later_turns_cache_hits_and_skips_failures():
    records = [turn(0, 0, 0.5, 100, 0), turn(0, 1, 0.1, 120, 96), turn(0, 2, 0.2, 140, 112),
               turn(1, 0, 0.4, 100, 0), turn(1, 1, 0.3, 120, 0), Turn(1, 2, status="429")]
    s = summarize(records, duration=10.0)
    assert (s["requests"], s["ok"]) == (6, 5)
    assert s["cache_hit_ratio"] == round(208 / 380, 3)           # turns 2+ only, failed request left out
    assert s["ttft_p50_s"] == 0.3 and s["ttft_p95_s"] == 0.5
    assert s["later_turns_ttft_p50_s"] == 0.2
    assert s["output_tokens_per_s"] == 5.0


def test_ratios_are_speedups_of_the_cache_aware_router():
    ca = {"ttft_p50_s": 0.1, "later_turns_ttft_p50_s": 0.05, "output_tokens_per_s": 150.0}
    p2 = {"ttft_p50_s": 0.3, "later_turns_ttft_p50_s": 0.2, "output_tokens_per_s": 100.0}
    r = ratios({"multiturn": ca, "no_shared_prefix": p2}, {"multiturn": p2, "no_shared_prefix": p2})
    assert r["multiturn"] == {"ttft_p50_speedup": 3.0, "later_turns_ttft_p50_speedup": 4.0, "throughput_ratio": 1.5}
    assert r["no_shared_prefix"]["throughput_ratio"] == 1.0


def test_routers_alternate_so_each_starts_first_as_often():
    from bench.multiturn import router_order
    assert router_order(1) == ["cache_aware", "power_of_two"]
    assert router_order(2) == ["cache_aware", "power_of_two", "power_of_two", "cache_aware"]
