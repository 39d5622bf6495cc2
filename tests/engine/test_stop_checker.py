"""Finish reasons through the scheduler: length, stop ids, eos, stop strings, max_model_len, abort; and the
incremental stop-string text, checked against decoding the whole output each step."""
import random
from pathlib import Path

import pytest

from deploy.tokenizer import Tokenizer
from engine.config import FULL
from engine.sampling_params import SamplingParams
from engine.sequence import FINISH_REASONS, Sequence, SequenceStatus
from engine.stop_checker import StopChecker
from tests.engine.helpers import make_scheduler, make_seq, run_step, run_until_done


def detokenize(token_ids: list[int]) -> str:
    """Fake tokenizer: id i is the letter chr(ord('a') + i)."""
    return "".join(chr(ord("a") + t) for t in token_ids)


def feed(*token_ids: int):
    """A fake model that emits the given ids in order, then 25 ('z') forever."""
    it = iter(token_ids)
    return lambda seq: next(it, 25)


def test_finish_reason_map_is_explicit():
    assert FINISH_REASONS == {SequenceStatus.FINISHED_STOPPED: "stop", SequenceStatus.FINISHED_LENGTH: "length",
                              SequenceStatus.FINISHED_ABORTED: "abort"}
    assert [s.is_finished for s in SequenceStatus] == [False, False, False, True, True, True]


def test_max_tokens_finishes_with_length():
    sched = make_scheduler()
    seq = make_seq(0, 5, max_tokens=3)
    sched.add(seq)
    run_until_done(sched, feed(1, 2, 3, 4))
    assert seq.output_token_ids == [1, 2, 3] and seq.finish_reason == "length" and seq.stop_reason is None


def test_stop_token_is_kept_and_recorded():
    sched = make_scheduler()
    seq = make_seq(0, 5, max_tokens=10, stop_token_ids=(3,))
    sched.add(seq)
    run_until_done(sched, feed(1, 2, 3, 4))
    assert seq.output_token_ids == [1, 2, 3] and seq.finish_reason == "stop" and seq.stop_reason == 3


def test_stop_token_on_the_last_allowed_token_is_a_stop():
    sched = make_scheduler()
    seq = make_seq(0, 5, max_tokens=2, stop_token_ids=(2,))
    sched.add(seq)
    run_until_done(sched, feed(1, 2))
    assert seq.finish_reason == "stop"


def test_eos_stops_unless_ignored():
    sched = make_scheduler(eos_token_ids=(9,))
    stops, ignores = make_seq(0, 5, max_tokens=5), make_seq(1, 5, max_tokens=5, ignore_eos=True)
    sched.add(stops)
    sched.add(ignores)
    run_until_done(sched, lambda seq: 9)
    assert stops.output_token_ids == [9] and stops.finish_reason == "stop" and stops.stop_reason == 9
    assert ignores.output_token_ids == [9] * 5 and ignores.finish_reason == "length"


def test_stop_string_truncates_text_not_ids():
    sched = make_scheduler(detokenize=detokenize)
    cut = make_seq(0, 5, max_tokens=10, stop=("cd", "zz"))
    kept = make_seq(1, 5, max_tokens=10, stop=("cd",), include_stop_str_in_output=True)
    sched.add(cut)
    run_until_done(sched, feed(0, 1, 2, 3, 4))        # a b c d e
    sched.add(kept)
    run_until_done(sched, feed(0, 1, 2, 3, 4))
    assert cut.output_token_ids == [0, 1, 2, 3] and cut.output_text == "ab"
    assert cut.finish_reason == "stop" and cut.stop_reason == "cd"
    assert kept.output_text == "abcd" and kept.stop_reason == "cd"


def test_stop_string_without_match_keeps_full_text():
    sched = make_scheduler(detokenize=detokenize)
    seq = make_seq(0, 5, max_tokens=3, stop=("q",))
    sched.add(seq)
    run_until_done(sched, feed(0, 1, 2))
    assert seq.output_text == "abc" and seq.finish_reason == "length"


def test_max_model_len_finishes_with_length():
    sched = make_scheduler(max_model_len=12, num_full_blocks=3)
    seq = make_seq(0, 9, max_tokens=100)
    sched.add(seq)
    run_until_done(sched)
    assert seq.num_tokens == 12 and seq.num_output_tokens == 3 and seq.finish_reason == "length"


def test_abort_frees_everything_at_once():
    sched = make_scheduler(max_num_batched_tokens=16, max_num_seqs=4)
    running = [make_seq(0, 20, request_id="r"), make_seq(1, 20, request_id="r")]  # n=2 under one request
    other = make_seq(2, 4, request_id="other", max_tokens=4)
    for seq in running + [other]:
        sched.add(seq)
    run_step(sched)                                   # seq 0 holds blocks mid-prefill, seq 1 waits
    assert sched.block_manager.num_free_blocks(FULL) < 64
    assert sched.abort("r") == running
    assert [s.finish_reason for s in running] == ["abort", "abort"]
    assert all(s.block_tables == {} for s in running)
    assert sched.block_manager.num_free_blocks(FULL) == 64
    assert sched.num_running == 0 and list(sched.waiting) == [other]
    assert sched.abort("r") == [] and sched.abort("unknown") == []
    run_until_done(sched)
    assert other.finish_reason == "length"


def test_abort_between_schedule_and_update_is_skipped():
    sched = make_scheduler()
    a, b = make_seq(0, 4, max_tokens=3), make_seq(1, 4, max_tokens=3)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    sched.abort(a.request_id)
    updated = sched.update(batch, [5, 6])
    assert updated == [b] and b.output_token_ids == [6] and a.output_token_ids == []
    assert a.finish_reason == "abort"


# --- incremental stop-string text: equal to decoding everything each step ------------------------------------
DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "deploy" / "demo_model" / "tokenizer.json"
TEXTS = ("Hello world. The café in Zürich serves crème brûlée.", "中文字符和 emoji 😀🎉 mixed with ASCII!",
         "naïve façade — “quotes” and ß, ø, ñ; 日本語のテキスト。", "<|start|>assistant<|message|>Done 👍<|end|>",
         "Stop here: STOP. Or here:: or ### there\n\nnew line", "ÿ\u00ad\u200b\U0001f9ea tokens 123456789")


class ReferenceStopChecker(StopChecker):
    """The stop-string rule as it was: detokenize the whole output each step and search all of it."""

    def _check_stop_strings(self, seq):
        text = self.detokenize(seq.output_token_ids)
        seq.output_text = text
        matches = [(text.find(stop), stop) for stop in seq.params.stop]
        matches = [(index, stop) for index, stop in matches if index >= 0]
        if not matches:
            return False
        index, stop = min(matches)
        end = index + len(stop) if seq.params.include_stop_str_in_output else index
        seq.output_text = text[:end]
        seq.finish(SequenceStatus.FINISHED_STOPPED, stop_reason=stop)
        return True


class CountingDetokenize:
    def __init__(self, detokenize):
        self.detokenize, self.calls, self.tokens = detokenize, 0, 0

    def __call__(self, ids):
        self.calls += 1
        self.tokens += len(ids)
        return self.detokenize(list(ids))


def run_both(ids, detokenize, max_model_len=10_000, **params):
    """Feed ids one by one to both checkers; assert they agree after every token; return the new one's seq."""
    new_checker = StopChecker(max_model_len, detokenize=detokenize)
    old_checker = ReferenceStopChecker(max_model_len, detokenize=detokenize)
    new, old = (Sequence(0, "r", [1], SamplingParams(**params)) for _ in range(2))
    for token_id in ids:
        new.append_token(token_id)
        old.append_token(token_id)
        done = new_checker.check(new)
        assert done == old_checker.check(old)
        assert (new.output_text, new.status, new.stop_reason) == (old.output_text, old.status, old.stop_reason), \
            f"after {new.num_output_tokens} tokens of {ids} with {params}"
        if done:
            break
    return new


@pytest.fixture(scope="module")
def demo_tokenizer():
    return Tokenizer(DEMO_TOKENIZER)


def byte_token_ids(tok):
    """id of the single-byte token of each byte 0..255 (GPT-2's byte-to-character table)."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    chars, extra = [], 0
    for b in range(256):
        chars.append(chr(b) if b in printable else chr(256 + extra))
        extra += b not in printable
    return [tok.token_id(c) for c in chars]


def random_ids(rng, tok, byte_ids):
    """Real text (merged tokens, multi-byte characters), multi-byte characters byte by byte (complete, cut short
    or followed by a stray continuation byte), random bytes, random ids including the special tokens."""
    ids = []
    for _ in range(rng.randint(1, 5)):
        kind = rng.random()
        if kind < 0.4:
            text = rng.choice(TEXTS)
            a = rng.randrange(len(text))
            ids += tok.encode(text[a:a + rng.randint(1, 40)])
        elif kind < 0.7:
            raw = rng.choice("é中😀ß👍日ñ").encode()
            raw = raw[:rng.randint(1, len(raw))] + (bytes([rng.randrange(0x80, 0xC0)]) if rng.random() < 0.2 else b"")
            ids += [byte_ids[b] for b in raw]
        elif kind < 0.85:
            ids += [byte_ids[rng.randrange(256)] for _ in range(rng.randint(1, 8))]
        else:
            ids += [rng.randrange(tok._tok.get_vocab_size()) for _ in range(rng.randint(1, 8))]
    return ids


def random_stops(rng, text):
    """Substrings of the text the ids decode to (so they do match, often across tokens), and strays."""
    stops = []
    for _ in range(rng.randint(1, 4)):
        if text and rng.random() < 0.75:
            a = rng.randrange(len(text))
            stops.append(text[a:a + rng.randint(1, 8)])
        else:
            stops.append(rng.choice(("\ufffd", "é", "😀", "<|end|>", "zzz", "中文", "\n\n", ". ", "::")))
    return tuple(stops)


@pytest.mark.parametrize("include_stop", [False, True])
def test_incremental_stop_strings_equal_full_detokenize_with_byte_level_bpe(demo_tokenizer, include_stop):
    rng, byte_ids = random.Random(1234 + include_stop), byte_token_ids(demo_tokenizer)
    assert demo_tokenizer.decode([byte_ids[b] for b in "é中😀".encode()]) == "é中😀"
    stopped = 0
    for _ in range(400):
        ids = random_ids(rng, demo_tokenizer, byte_ids)
        stops = random_stops(rng, demo_tokenizer.decode(ids))
        seq = run_both(ids, demo_tokenizer.decode, max_tokens=len(ids), stop=stops,
                       include_stop_str_in_output=include_stop)
        stopped += isinstance(seq.stop_reason, str)
    assert stopped > 200            # most cases end on a stop string, not on length


def byte_detokenizer(rng, texts, num_pieces=300):
    """An emulated byte-level vocabulary: each id is a random slice of UTF-8 bytes, cut anywhere (mid-character);
    detokenize joins the bytes and decodes with errors="replace", as byte-level BPE does."""
    blob = "".join(texts).encode()
    pieces = [bytes([b]) for b in range(256)]
    for _ in range(num_pieces):
        a = rng.randrange(len(blob))
        pieces.append(blob[a:a + rng.randint(2, 6)])
    return pieces, lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")


def test_incremental_stop_strings_equal_full_detokenize_with_split_characters():
    rng = random.Random(7)
    pieces, detokenize = byte_detokenizer(rng, TEXTS)
    for _ in range(400):
        ids = [rng.randrange(len(pieces)) if rng.random() < 0.3 else rng.randrange(256, len(pieces))
               for _ in range(rng.randint(1, 60))]
        run_both(ids, detokenize, max_tokens=len(ids), stop=random_stops(rng, detokenize(ids)),
                 include_stop_str_in_output=rng.random() < 0.5)


def sentencepiece_like(pieces):
    """A decoder whose text of a window is not a plain slice: '▁' is a space, except the text's first one."""
    def detokenize(ids):
        text = "".join(pieces[i] for i in ids).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text
    return detokenize


def cleanup_spaces(pieces):
    """A decoder that is not prefix-stable: " ." becomes "." once the "." arrives (tokenization cleanup)."""
    def detokenize(ids):
        return "".join(pieces[i] for i in ids).replace(" .", ".").replace(" ,", ",")
    return detokenize


@pytest.mark.parametrize("make", [sentencepiece_like, cleanup_spaces])
def test_incremental_stop_strings_equal_full_detokenize_with_other_decoders(make):
    rng = random.Random(11)
    pieces = ["▁", "▁a", "b", "▁cd", ".", ",", " ", "e", "▁.", "f▁", "é", "中"]
    detokenize = make(pieces)
    for _ in range(600):
        ids = [rng.randrange(len(pieces)) for _ in range(rng.randint(1, 30))]
        run_both(ids, detokenize, max_tokens=len(ids), stop=random_stops(rng, detokenize(ids)),
                 include_stop_str_in_output=rng.random() < 0.5)


def test_stop_string_spanning_tokens_with_text_after_it(demo_tokenizer):
    tok = demo_tokenizer
    ids = tok.encode("alpha be") + tok.encode("ta gamma")        # al|ph|a| be|t|a| g|a|m|m|a
    assert [tok.decode([i]) for i in ids[2:4]] == ["a", " be"]
    seq = run_both(ids, tok.decode, max_tokens=100, stop=("a b", "gamma"))  # completed inside " be"
    assert seq.output_text == "alph" and seq.stop_reason == "a b"
    assert seq.output_token_ids == ids[:4]                         # ids are not cut
    kept = run_both(ids, tok.decode, max_tokens=100, stop=("a b",), include_stop_str_in_output=True)
    assert kept.output_text == "alpha b" and kept.output_token_ids == ids[:4]


def test_earliest_match_wins_then_the_smaller_string():
    seq = run_both([0, 1, 2, 3], detokenize, max_tokens=10, stop=("bcd", "cd", "b"))
    assert seq.stop_reason == "b" and seq.output_text == "a"
    seq = run_both([0, 1, 2, 3], detokenize, max_tokens=10, stop=("cd", "bc"))
    assert seq.stop_reason == "bc" and seq.num_output_tokens == 3


def test_split_multibyte_character_waits_for_its_last_byte(demo_tokenizer):
    tok = demo_tokenizer
    ids = tok.encode("x😀y")
    seq = run_both(ids, tok.decode, max_tokens=100, stop=("😀",))
    assert seq.output_text == "x" and seq.stop_reason == "😀"
    # A stop string "\ufffd" matches the incomplete character, as decoding everything each step did.
    seq = run_both(ids, tok.decode, max_tokens=100, stop=("\ufffd",))
    assert seq.output_text == "x" and seq.num_output_tokens < len(ids)


def test_output_text_is_the_full_text_when_no_stop_string_matches(demo_tokenizer):
    tok = demo_tokenizer
    ids = tok.encode("é中😀 hello") + tok.encode("中")[:1]     # ends inside a character
    seq = run_both(ids, tok.decode, max_tokens=len(ids), stop=("nope",))
    assert seq.finish_reason == "length" and seq.output_text == tok.decode(ids)


def test_detokenize_work_is_linear_in_the_output(demo_tokenizer):
    tok, rng = demo_tokenizer, random.Random(5)
    ids = []
    while len(ids) < 2000:
        ids += tok.encode(rng.choice(TEXTS))
    ids = ids[:2000]
    counting = CountingDetokenize(tok.decode)
    checker = StopChecker(10_000, detokenize=counting)
    seq = Sequence(0, "r", [1], SamplingParams(max_tokens=2000, stop=("never matches",)))
    for token_id in ids:
        seq.append_token(token_id)
        checker.check(seq)
    assert seq.finish_reason == "length" and seq.output_text == tok.decode(ids)
    assert counting.calls <= 2 * len(ids)
    assert counting.tokens <= 12 * len(ids)       # decoding everything each step: ~len(ids)**2 / 2 = 2,000,000


def test_stop_string_through_the_scheduler_with_the_demo_tokenizer(demo_tokenizer):
    tok = demo_tokenizer
    ids = tok.encode("Answer: 中文 done. More text")
    sched = make_scheduler(detokenize=tok.decode)
    seq = make_seq(0, 5, max_tokens=50, stop=("done.",))
    sched.add(seq)
    run_until_done(sched, feed(*ids))
    assert seq.output_text == "Answer: 中文 " and seq.stop_reason == "done." and seq.finish_reason == "stop"
    assert not hasattr(seq, "_stop_text")           # the window state goes with the finish
