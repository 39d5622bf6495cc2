"""Harmony parsing of generated ids: channels, tool calls, recipients, garbage, and streaming == one-shot."""
import json
import random

import pytest

from deploy.harmony.output import CONTENT, REASONING, TOOL, HarmonyDelta
from deploy.harmony.parser import HarmonyStreamParser, parse_completion
from deploy.openai.protocol_outputs import ChatMessage, DeltaMessage
from deploy.tokenizer import Tokenizer
from model.tiny import TinySpec, write_tiny

ANALYSIS_FINAL = ("<|channel|>analysis<|message|>User asks: \"What is 2 + 2?\" Simple arithmetic.<|end|>"
                  "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>")
TOOL_CALL = ("<|channel|>analysis<|message|>Need to use function get_weather.<|end|>"
             "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
             '<|message|>{"city": "Oslo"}<|call|>')


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_model_dir(write_tiny(tmp_path_factory.mktemp("parser") / "m", TinySpec(seed=2)))


def stream(tok, ids):
    """Feed one id at a time; return the concatenated deltas and the parser."""
    parser, total = HarmonyStreamParser(tok), HarmonyDelta()
    for i in ids:
        total.merge(parser.process(i))
    total.merge(parser.finish())
    return total, parser


def test_analysis_then_final(tok):
    parsed = parse_completion(tok, tok.encode(ANALYSIS_FINAL))
    assert parsed.reasoning_content == 'User asks: "What is 2 + 2?" Simple arithmetic.'
    assert parsed.content == "2 + 2 = 4."
    assert parsed.tool_calls == [] and parsed.finish_reason == "stop"
    assert [(m.channel, m.kind, m.end) for m in parsed.messages] == [
        ("analysis", REASONING, "<|end|>"), ("final", CONTENT, "<|return|>")]


def test_tool_call_with_constrain_json(tok):
    parsed = parse_completion(tok, tok.encode(TOOL_CALL))
    assert parsed.reasoning_content == "Need to use function get_weather." and parsed.content is None
    (call,) = parsed.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}
    assert call.id.startswith("call_") and parsed.finish_reason == "tool_calls"
    last = parsed.messages[-1]
    assert (last.channel, last.recipient, last.content_type, last.kind) == (
        "commentary", "functions.get_weather", "json", TOOL)


@pytest.mark.parametrize("text", [
    ' to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>{"city": "Lima"}<|call|>',
    '<|channel|>analysis<|message|>x<|end|><|start|>assistant to=functions.get_weather<|channel|>commentary json'
    '<|message|>{"city": "Lima"}<|call|>',
])
def test_recipient_in_the_role_part_of_the_header(tok, text):
    parsed = parse_completion(tok, tok.encode(text))
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("get_weather", '{"city": "Lima"}')]
    assert parsed.messages[-1].content_type == "json" and parsed.finish_reason == "tool_calls"


def test_preamble_is_content_and_other_recipients_are_reasoning(tok):
    text = ("<|channel|>commentary<|message|>Let me check.<|end|>"
            "<|start|>assistant<|channel|>analysis to=browser.search<|message|>{\"query\": \"x\"}<|end|>"
            "<|start|>assistant<|channel|>commentary to=functions.f <|constrain|>json<|message|>{}<|call|>")
    parsed = parse_completion(tok, tok.encode(text))
    assert parsed.content == "Let me check."
    assert parsed.reasoning_content == '{"query": "x"}'
    assert [c.name for c in parsed.tool_calls] == ["f"]


def test_truncated_output_keeps_what_arrived_and_the_engine_finish_reason(tok):
    ids = tok.encode(ANALYSIS_FINAL)[:-3]      # cut inside the final message: "2 + 2 = " (no <|return|>)
    parsed = parse_completion(tok, ids, finish_reason="length")
    assert parsed.finish_reason == "length"
    assert parsed.content == tok.decode(ids[ids.index(tok.token_id("<|message|>"), 5) + 1:])
    assert parsed.messages[-1].end is None
    cut_call = tok.encode(TOOL_CALL)[:-2]
    assert parse_completion(tok, cut_call, finish_reason="length").finish_reason == "length"


def test_streaming_deltas_concatenate_to_the_one_shot_result(tok):
    text = ("<|channel|>analysis<|message|>Ünïcödé thoughts: 日本語 🙂🙂<|end|>"
            "<|start|>assistant<|channel|>commentary<|message|>Calling…<|end|>"
            "<|start|>assistant<|channel|>commentary to=functions.lookup <|constrain|>json"
            '<|message|>{"q": "größe 東京"}<|call|>')
    ids = tok.encode(text)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids)      # multi-byte characters are split over ids
    total, parser = stream(tok, ids)
    one_shot = parse_completion(tok, ids)
    assert "\ufffd" not in total.reasoning_content + total.content
    assert total.reasoning_content == one_shot.reasoning_content == "Ünïcödé thoughts: 日本語 🙂🙂"
    assert total.content == one_shot.content == "Calling…"
    (call,) = total.tool_calls
    assert (call.index, call.name, call.arguments) == (0, "lookup", one_shot.tool_calls[0].arguments)
    assert call.arguments == '{"q": "größe 東京"}' and call.id == parser.tool_calls[0].id
    assert parser.finish_reason("stop") == "tool_calls"


def test_streaming_state_tracks_channel_and_recipient(tok):
    parser = HarmonyStreamParser(tok)
    seen = []
    for i in tok.encode(TOOL_CALL):
        delta = parser.process(i)
        seen.append((parser.current_channel, parser.current_recipient))
        if delta.tool_calls and delta.tool_calls[0].id:
            first = delta.tool_calls[0]
            assert (first.index, first.name, first.arguments) == (0, "get_weather", "")
    assert ("analysis", None) in seen and ("commentary", "functions.get_weather") in seen
    assert seen[-1] == (None, None)       # <|call|> closed the message


def test_feed_merges_a_steps_tokens(tok):
    ids = tok.encode(ANALYSIS_FINAL)
    parser = HarmonyStreamParser(tok)
    delta = parser.feed(ids)
    assert delta.reasoning_content.startswith("User asks") and delta.content == "2 + 2 = 4."
    chunk = DeltaMessage.from_harmony(delta, role=True)
    assert (chunk.role, chunk.content, chunk.tool_calls) == ("assistant", "2 + 2 = 4.", None)


@pytest.mark.parametrize("text, content", [
    ("Hello, just text.", "Hello, just text."),                      # no header at all
    ("<|message|>bare<|end|>", "bare"),                               # a message without a header
    ("<|channel|>final<|message|>no start token<|return|>", "no start token"),
    ("<|channel|>final<|message|>a<|channel|>b<|end|>", "ab"),        # structure tokens inside content are dropped
    ("<|channel|>mystery<|message|>unknown channel<|end|>", "unknown channel"),
])
def test_malformed_output_falls_back_to_content(tok, text, content):
    assert parse_completion(tok, tok.encode(text)).content == content


def test_plain_text_streams_as_content_from_the_first_token(tok):
    parser, ids = HarmonyStreamParser(tok), tok.encode("Hello there friend")
    assert [parser.process(i).content for i in ids] == [tok.decode([i]) for i in ids]   # not held as a header


def test_random_ids_never_raise_and_streaming_still_agrees(tok):
    rng = random.Random(0)
    specials = [tok.token_id(s) for s in ("<|start|>", "<|end|>", "<|channel|>", "<|message|>", "<|return|>",
                                          "<|call|>", "<|constrain|>", "<|endoftext|>")]
    for _ in range(300):
        ids = [rng.choice(specials) if rng.random() < 0.2 else rng.randrange(1024) for _ in range(rng.randrange(80))]
        parsed = parse_completion(tok, ids)
        total, _ = stream(tok, ids)
        assert (total.content or None) == parsed.content
        assert (total.reasoning_content or None) == parsed.reasoning_content
        args = {}
        for call in total.tool_calls:
            args[call.index] = args.get(call.index, "") + call.arguments
        assert [args[i] for i in sorted(args)] == [c.arguments for c in parsed.tool_calls]


def test_special_ids_come_from_the_tokenizer_not_constants(tok, tmp_path):
    other = Tokenizer.from_model_dir(write_tiny(tmp_path / "m", TinySpec(seed=2, vocab=700)))
    assert other.token_id("<|channel|>") != tok.token_id("<|channel|>")
    for t in (tok, other):
        parsed = parse_completion(t, t.encode(TOOL_CALL))
        assert [c.name for c in parsed.tool_calls] == ["get_weather"]


def test_chat_message_from_parsed_completion(tok):
    message = ChatMessage.from_parsed(parse_completion(tok, tok.encode(TOOL_CALL)))
    body = message.model_dump()
    assert body["content"] is None and body["reasoning_content"] == "Need to use function get_weather."
    assert body["tool_calls"][0]["type"] == "function"
    assert body["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
