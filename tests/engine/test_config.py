"""CacheConfig and SchedulerConfig reject bad values with actionable messages."""
import pytest

from engine.config import CacheConfig, SchedulerConfig, max_blocks_spanned


@pytest.mark.parametrize("make, message", [
    (lambda: CacheConfig(num_full_blocks=0), "num_full_blocks must be at least 1"),
    (lambda: CacheConfig(num_full_blocks=4, block_size=0), "block_size must be a positive"),
    (lambda: CacheConfig(num_full_blocks=4, sliding_window=128), "needs a sliding block pool"),
    (lambda: CacheConfig(num_full_blocks=4, num_sliding_blocks=4, sliding_window=0), "sliding_window must be"),
    (lambda: SchedulerConfig(max_num_seqs=0), "max_num_seqs must be at least 1"),
    (lambda: SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=32), "must be >= max_num_seqs"),
    (lambda: SchedulerConfig(enable_chunked_prefill=False, max_num_batched_tokens=512, max_model_len=4096),
     "enable chunked prefill, raise max_num_batched_tokens or lower max_model_len"),
])
def test_configs_reject_bad_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_max_blocks_spanned_covers_every_alignment():
    for block_size in (1, 4, 16):
        for n in range(1, 40):
            worst = max((offset + n - 1) // block_size - offset // block_size + 1 for offset in range(64))
            assert max_blocks_spanned(n, block_size) == worst
    assert max_blocks_spanned(0, 16) == 0
