"""`epserve serve --gateway-replicas 2`: two Gateway replicas, each with its own token channel, both fed by the one
ModelServer replica; concurrent streams through Serve's proxy (which spreads them over both gateways) all complete
with the same greedy text, and /health is ready."""
import asyncio

import httpx
import openai

from bench.process_cpu import snapshot
from tests.deploy.live_server import live_server, session_pids

PROMPT = "<|start|>user<|message|>What is 2 + 3?<|end|><|start|>assistant"


def test_two_gateways_share_one_model_replica():
    with live_server("--ep-size", "1", "--gateway-replicas", "2") as (url, proc):
        gateways = session_pids(proc, "ServeReplica:epserve:Gateway")
        assert len(gateways) == 2
        assert httpx.get(f"{url}/health").json() == {}
        before = snapshot(proc.pid)

        async def one(client):
            chunks = await client.completions.create(model=None, prompt=PROMPT, max_tokens=24, temperature=0,
                                                     stream=True)
            return "".join([c.choices[0].text async for c in chunks if c.choices])

        async def run():
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none") as client:
                return await asyncio.gather(*(one(client) for _ in range(48)))
        texts = asyncio.run(run())
        after = snapshot(proc.pid)
        busy = [after[pid].cpu_s - before[pid].cpu_s for pid in gateways]
        assert len(set(texts)) == 1 and "2 + 3 = 5" in texts[0]
        assert min(busy) > 0.05, busy          # both gateways served streams (an idle one spends ~0.01 s here)
