"""bench/decode_profile.py on CPU with the tiny config: the same code the GPU run uses, its JSON shape checked."""
from bench import decode_profile


def test_profile_ranks_ops_and_accounts_for_the_step_time():
    result = decode_profile.main(["--device", "cpu", "--tiny", "--steps", "3", "--top", "4"])
    for mode in ("eager", "graphs"):
        row = result[mode]
        assert 0 < len(row["top"]) <= 4
        shares = [k["share"] for k in row["top"]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0 + 1e-6
        assert 0 < row["device_ms_per_step"] <= row["wall_ms_per_step"] * 1.05   # host ops timed inside the wall
