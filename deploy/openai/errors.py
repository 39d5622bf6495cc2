"""OpenAI-style error bodies and the typed errors that carry their HTTP status (DESIGN.md "Serving").

Owns `{"error": {"message", "type", "param", "code"}}` as vLLM writes it (ANCHORS [V6]): `type` is the OpenAI SDK's
exception class name for the status ("BadRequestError", ...) and `code` the HTTP status as an int. It renders no
HTTP responses itself; the gateway turns an APIError into one with `status_code`, `headers` and `response()`.
"""
from __future__ import annotations

import math

from pydantic import BaseModel, ValidationError


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """An error a client sees: subclasses fix the status; the message says what to change."""

    status_code = 500
    error_type = "InternalServerError"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    def response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.error_type, param=self.param,
                                             code=self.status_code))


class BadRequestError(APIError):
    status_code, error_type = 400, "BadRequestError"


class AuthenticationError(APIError):
    status_code, error_type = 401, "AuthenticationError"


class NotFoundError(APIError):
    status_code, error_type = 404, "NotFoundError"


class RequestTooLargeError(APIError):
    status_code, error_type = 413, "RequestTooLargeError"


class RateLimitError(APIError):
    status_code, error_type = 429, "RateLimitError"


class ServiceUnavailableError(APIError):
    status_code, error_type = 503, "ServiceUnavailableError"


def context_length_error(max_model_len: int, prompt_len: int, max_tokens: int) -> BadRequestError:
    """vLLM's wording, so clients and scripts that match on it keep working."""
    return BadRequestError(
        f"This model's maximum context length is {max_model_len} tokens. However, you requested "
        f"{prompt_len + max_tokens} tokens ({prompt_len} in the messages, {max_tokens} in the completion). "
        f"Please reduce the length of the messages or completion.", param="max_tokens")


def prompt_too_long_error(max_model_len: int, prompt_len: int) -> BadRequestError:
    """The prompt alone leaves no room for a single generated token."""
    return BadRequestError(
        f"This model's maximum context length is {max_model_len} tokens. However, your messages resulted in "
        f"{prompt_len} tokens. Please reduce the length of the messages.", param="messages")


def model_not_found_error(model: str) -> NotFoundError:
    return NotFoundError(f"The model `{model}` does not exist.", param="model")


def route_not_found_error(path: str) -> NotFoundError:
    return NotFoundError(f"Unknown route {path}; see /v1/models, /v1/chat/completions, /v1/completions, "
                         f"/v1/responses and /health.")


def invalid_api_key_error() -> AuthenticationError:
    return AuthenticationError("Invalid or missing API key: send it as the header 'Authorization: Bearer <key>'.")


def request_too_large_error(max_body_bytes: int) -> RequestTooLargeError:
    return RequestTooLargeError(f"The request body is larger than the limit of {max_body_bytes} bytes.")


def queue_full_error(retry_after_s: float) -> RateLimitError:
    seconds = max(1, math.ceil(retry_after_s))
    return RateLimitError(f"The server is at capacity (request queue full); retry after {seconds} s.",
                          headers={"Retry-After": str(seconds)})


def no_healthy_replica_error() -> ServiceUnavailableError:
    return ServiceUnavailableError("No healthy model replica is available; retry later.")


def validation_error(exc: ValidationError) -> BadRequestError:
    """A pydantic validation failure as one 400: the first problem, named by its field path."""
    errors = exc.errors(include_url=False)
    if not errors:
        return BadRequestError(str(exc))
    first = errors[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if not (isinstance(p, str) and p.startswith("function-")))
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return BadRequestError(f"{param}: {message}{more}" if param else message + more, param=param or None)
