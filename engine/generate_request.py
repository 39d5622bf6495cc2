"""GenerateRequest: the gateway -> replica contract, in token ids (TokenOutput is the way back)."""
from __future__ import annotations

import dataclasses

from engine.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
