"""schemathesis against a live `epserve serve`: the schema comes from the server's own GET /openapi.json, and cases
generated from it (valid and invalid bodies, path and query parameters) go to every operation over HTTP. No answer
is a 5xx, every 4xx carries OpenAI's error body, and the server still serves afterwards.

Generated bodies may ask for thousands of tokens (or none: then the context's rest); to keep the run short each
generation request's max_tokens / max_completion_tokens / max_output_tokens is set to at most 4 and `n` to at most 2
before it is sent. Cases are derandomized (the same every run) and bounded per operation; no shrinking, so a
failure reports the generated case as it was sent, in one pass.
"""
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from deploy.openai.errors import ErrorResponse
from tests.deploy.live_server import live_server

MAX_EXAMPLES = 40   # per operation, valid and invalid cases together
TOKEN_LIMITS = {"/v1/chat/completions": "max_completion_tokens", "/v1/completions": "max_tokens",
                "/v1/responses": "max_output_tokens"}
CAPS = {"max_tokens": 4, "max_completion_tokens": 4, "max_output_tokens": 4, "n": 2}


@pytest.fixture(scope="module")
def server():
    with live_server("--ep-size", "1") as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(f"{server[0]}/openapi.json", timeout=30)


def openai_error_body(ctx, response, case) -> None:
    """A custom check: every 4xx answer is `{"error": {"message", "type", "param", "code"}}` with code = status."""
    if 400 <= response.status_code < 500:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
        assert ErrorResponse.model_validate(body).error.code == response.status_code, body


def cap_generation(case) -> None:
    """Keep a generated generation request cheap: few tokens, few choices (see the module docstring)."""
    if not isinstance(case.body, dict) or case.path not in TOKEN_LIMITS:
        return
    case.body.setdefault(TOKEN_LIMITS[case.path], CAPS[TOKEN_LIMITS[case.path]])
    for key, cap in CAPS.items():
        if isinstance(case.body.get(key), int) and not isinstance(case.body[key], bool) and case.body[key] > cap:
            case.body[key] = cap


def fuzz(schema, url: str, method: str) -> list[str]:
    """Run MAX_EXAMPLES cases (positive and negative) per `method` operation; the failures, one line each."""
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.method.upper() != method:
            continue
        strategy = st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                             operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

        @settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case):
            cap_generation(case)
            case.call_and_validate(base_url=url, checks=[not_a_server_error, openai_error_body], timeout=60)

        try:
            run()
        except Exception as e:   # noqa: BLE001  a failed check (schemathesis' FailureGroup) or a transport error
            failures.append(f"{method} {operation.path}: {e}")
    return failures


def test_schema_lists_every_route(schema):
    operations = {(r.ok().method.upper(), r.ok().path) for r in schema.get_all_operations()}
    assert {("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/responses"),
            ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/v1/models"), ("GET", "/health")} <= operations


@pytest.mark.parametrize("method", ["POST", "GET", "DELETE"])
def test_generated_requests_get_no_5xx_and_openai_errors(server, schema, method):
    failures = fuzz(schema, server[0], method)
    assert not failures, "\n\n".join(failures)


def test_server_still_serves(server):
    url, proc = server
    assert proc.poll() is None
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
