"""GET /openapi.json on the gateway's app (deploy/gateway.py build_api): the request bodies are the routes' pydantic
models, every operation lists OpenAI's error body, and the document is open without an API key. No Ray runs."""
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from deploy import gateway
from deploy.openai.errors import ErrorResponse
from deploy.openai.openapi_schema import SCHEMAS
from deploy.openai.protocol import ChatCompletionRequest, CompletionRequest
from deploy.openai.responses_protocol import ResponsesRequest
from deploy.openai.tokenize_routes import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest

BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
          "/v1/responses": ResponsesRequest, "/detokenize": DetokenizeRequest}


@pytest.fixture(scope="module")
def client():
    api = gateway.build_api()
    api.state.ctx = SimpleNamespace(api_keys=frozenset({"secret"}), metrics=None)   # auth on: only _guard reads it
    return TestClient(api)


@pytest.fixture(scope="module")
def doc(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200, response.text
    return response.json()


def _body_schema(doc: dict, path: str) -> dict:
    return doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def _resolve(doc: dict, ref: str) -> dict:
    assert ref.startswith(SCHEMAS), ref
    return doc["components"]["schemas"][ref.removeprefix(SCHEMAS)]


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if "$ref" in node else []) + [r for v in node.values() for r in _refs(v)]
    return [r for v in node for r in _refs(v)] if isinstance(node, list) else []


@pytest.mark.parametrize("path", sorted(BODIES))
def test_request_body_is_the_routes_model(doc, path):
    model = BODIES[path]
    assert doc["paths"][path]["post"]["requestBody"]["required"] is True
    schema = _resolve(doc, _body_schema(doc, path)["$ref"])
    expected = model.model_json_schema(ref_template=SCHEMAS + "{model}")
    expected.pop("$defs", None)
    assert schema == expected
    assert set(schema["properties"]) == set(model.model_fields)


def test_chat_schema_names_model_and_messages(doc):
    schema = _resolve(doc, _body_schema(doc, "/v1/chat/completions")["$ref"])
    assert schema["required"] == ["messages"]
    assert {"model", "messages", "max_tokens", "response_format", "tools"} <= set(schema["properties"])
    roles = {_resolve(doc, ref)["properties"]["role"].get("const") for ref in _refs(schema["properties"]["messages"])}
    assert {"system", "developer", "user", "assistant", "tool"} <= roles
    assert _resolve(doc, _body_schema(doc, "/v1/completions")["$ref"])["required"] == ["prompt"]
    assert _resolve(doc, _body_schema(doc, "/v1/responses")["$ref"])["required"] == ["input"]


def test_tokenize_takes_a_prompt_or_messages(doc):
    alternatives = [_resolve(doc, s["$ref"]) for s in _body_schema(doc, "/tokenize")["anyOf"]]
    assert [s["title"] for s in alternatives] == [TokenizeCompletionRequest.__name__, TokenizeChatRequest.__name__]
    assert [s["required"] for s in alternatives] == [["prompt"], ["messages"]]


def test_every_route_listed_with_openai_errors(client, doc):
    listed = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert {("GET", "/health"), ("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"), ("GET", "/version"),
            ("GET", "/v1/responses/{response_id}"), ("DELETE", "/v1/responses/{response_id}"),
            ("GET", "/v1/responses/{response_id}/input_items"), ("POST", "/v1/responses/{response_id}/cancel"),
            ("POST", "/tokenize"), *(("POST", path) for path in BODIES)} <= listed
    for path, ops in doc["paths"].items():
        for method, operation in ops.items():
            assert "422" not in operation["responses"], (method, path)   # bad requests are 400s here
            for status in ("400", "404", "503"):
                schema = operation["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": SCHEMAS + "ErrorResponse"}, (method, path, status)
    assert doc["components"]["schemas"]["ErrorInfo"]["required"] == ["message", "type", "code"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert ErrorResponse.model_validate(client.get("/v1/models").json())   # the key is checked: 401 in that body


def test_every_ref_resolves(doc):
    refs = _refs(doc["paths"]) + _refs(doc["components"])
    assert len(refs) > 20
    for ref in refs:
        _resolve(doc, ref)


def test_input_items_query_parameters_declared(doc):
    params = {p["name"]: p for p in doc["paths"]["/v1/responses/{response_id}/input_items"]["get"]["parameters"]}
    assert params["limit"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 100}
    assert params["order"]["schema"] == {"enum": ["asc", "desc"]}
    assert params["response_id"]["in"] == "path"
