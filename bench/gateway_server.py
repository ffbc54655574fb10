"""One gateway process for bench/gateway.py: memory storage, one OpenAI model at the upstream.

Run `python -m bench.gateway_server PORT UPSTREAM_URL`.
"""

from __future__ import annotations

import asyncio
import os
import sys

import uvicorn

from app.config import Settings
from app.credentials.entities import Provider, StoredCredential
from app.main import create_app
from app.models.entities import Model
from app.storage.memory import MemoryStorage

ADMIN = "gw-bench-admin-key-0123456789abcdefghij"


async def seed(storage: MemoryStorage, upstream: str) -> None:
    os.environ["BENCH_UPSTREAM_KEY"] = "sk-bench"
    async with storage.unit_of_work() as uow:
        await uow.repo(StoredCredential).add(
            StoredCredential(
                id="bench",
                name="bench",
                provider=Provider.OPENAI,
                env_var="BENCH_UPSTREAM_KEY",
                endpoint=upstream + "/v1",
            )
        )
        await uow.repo(Model).add(
            Model(
                id="bench",
                name="bench",
                provider=Provider.OPENAI,
                provider_model="bench",
                credential_id="bench",
                parameters={"max_retries": 0},
            )
        )
        await uow.commit()


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2]
    storage = MemoryStorage()
    asyncio.run(seed(storage, upstream))
    settings = Settings(BROKER="stub", ADMIN_API_KEY=ADMIN, LOG_LEVEL="WARNING")  # type: ignore[arg-type]
    app = create_app(settings, storage=storage)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )


if __name__ == "__main__":
    main()
