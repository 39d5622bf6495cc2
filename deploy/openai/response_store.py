"""Stored Responses: what is kept per response (StoredResponse) and the interface every store shares.

A stored response is the response object as its client got it plus the items it was generated from (earlier turns'
input and output items, then its own input), so a later turn with `previous_response_id` needs one read, and the
digest of the API key that created it: only that key sees it (everyone, when the server has no API keys). Stores
keep JSON text under the response id: in the Ray cluster (response_store_ray.py, an LRU in one Serve replica) or in
Redis (response_store_redis.py). A store that cannot be reached is a 503 naming it; a missing id is `None`.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from abc import ABC, abstractmethod

from pydantic import BaseModel

from deploy.openai.errors import APIError, BadRequestError, NotFoundError, ServiceUnavailableError

logger = logging.getLogger(__name__)


class StoredResponse(BaseModel):
    response: dict               # the response object (status, output, usage, ...) as returned
    input_items: list[dict]      # every item it was generated from, oldest first, each with an id
    owner: str | None = None     # key_owner() of the API key that created it; None: the server has no API keys


def key_owner(api_key: str) -> str:
    """Who owns a stored response: a digest of the API key that created it (the key itself is never stored)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


class ResponseStore(ABC):
    """JSON text by response id; `save`, `load` and `remove` are what the routes call."""

    name = "response store"

    async def save(self, record: StoredResponse) -> None:
        await self._call(self.put(record.response["id"], record.model_dump_json()))

    async def load(self, response_id: str, owner: str | None = None) -> StoredResponse | None:
        """The response if it is stored and `owner`'s (another API key's response is as good as absent)."""
        value = await self._call(self.get(response_id))
        record = None if value is None else StoredResponse.model_validate_json(value)
        return record if record is not None and hmac.compare_digest(record.owner or "", owner or "") else None

    async def remove(self, response_id: str) -> bool:
        return await self._call(self.delete(response_id))

    async def _call(self, awaitable):
        try:
            return await awaitable
        except APIError:
            raise
        except Exception as e:
            logger.error("%s failed: %s", self.name, e, exc_info=e)
            raise ServiceUnavailableError(f"The {self.name} is unavailable ({type(e).__name__}); retry later.") \
                from None

    @abstractmethod
    async def put(self, key: str, value: str) -> None:
        """Keep `value` under `key` (for the store's time to live)."""

    @abstractmethod
    async def get(self, key: str) -> str | None:
        """The value under `key`, None when there is none (never stored, deleted, expired or evicted)."""

    @abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove `key`; whether it was there."""


class _ResponseNotFound(NotFoundError):
    error_type = "invalid_request_error"         # OpenAI's type for an unknown response id


class _PreviousResponseNotFound(BadRequestError):
    error_type = "invalid_request_error"


def response_not_found_error(response_id: str) -> NotFoundError:
    """OpenAI's 404 for an id never stored (store: false), deleted, expired or evicted."""
    return _ResponseNotFound(f"Response with id '{response_id}' not found.")


def previous_response_not_found_error(response_id: str) -> BadRequestError:
    """OpenAI answers a `previous_response_id` it does not have with 400 (code previous_response_not_found)."""
    return _PreviousResponseNotFound(f"Previous response with id '{response_id}' not found.",
                                     param="previous_response_id")


def open_response_store(args, handle=None) -> ResponseStore:
    """The gateway's store for AppArgs `args`: Redis for a redis:// URL, else the app's ResponseStore deployment
    reached through `handle`."""
    from deploy.app_config import RAY_STORE
    if args.response_store == RAY_STORE:
        from deploy.openai.response_store_ray import RayResponseStore
        if handle is None:
            raise ValueError("response_store 'ray' needs the ResponseStore deployment's handle")
        return RayResponseStore(handle)
    from deploy.openai.response_store_redis import RedisResponseStore
    return RedisResponseStore(args.response_store, ttl_s=args.response_store_ttl_s)
