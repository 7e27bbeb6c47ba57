"""The prefill engine's bootstrap server for the kvlane backend: an HTTP endpoint where each prefill TP rank
registers (engine id, TP size, page size) and decode reads them back before its first request.

Runs in SGLang's main process (SGLang starts it through `get_kv_class(..., BOOTSTRAP_SERVER)`), on its own
thread and event loop. It never carries KV, leases or page lists: those go through the policy service.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from aiohttp import web
from kvlane.policy.types import Name
from pydantic import BaseModel, ConfigDict, Field, ValidationError

log = logging.getLogger("kvlane.sglang")


class RankRegistration(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    engine_id: Name
    rank: int = Field(ge=0, lt=64)
    tp_size: int = Field(ge=1, le=64)
    page_size: int = Field(ge=1)


class BootstrapRegistry:
    """The registrations, checked for consistency (one engine, one TP size, one page size)."""

    def __init__(self) -> None:
        self.ranks: dict[int, RankRegistration] = {}

    def register(self, reg: RankRegistration) -> None:
        if reg.rank >= reg.tp_size:
            raise ValueError(f"rank {reg.rank} outside tp_size {reg.tp_size}")
        for other in self.ranks.values():
            if other.rank != reg.rank and (other.engine_id, other.tp_size, other.page_size) != (
                    reg.engine_id, reg.tp_size, reg.page_size):
                raise ValueError(f"rank {reg.rank} registers ({reg.engine_id}, TP={reg.tp_size}, page={reg.page_size}) "
                                 f"but rank {other.rank} registered ({other.engine_id}, TP={other.tp_size}, "
                                 f"page={other.page_size})")
        self.ranks[reg.rank] = reg

    def info(self) -> dict[str, Any]:
        if not self.ranks:
            return {"complete": False, "ranks": []}
        any_reg = next(iter(self.ranks.values()))
        return {"complete": len(self.ranks) == any_reg.tp_size, "engine_id": any_reg.engine_id,
                "tp_size": any_reg.tp_size, "page_size": any_reg.page_size, "dp_size": 1,
                "ranks": sorted(self.ranks)}


def make_app(registry: BootstrapRegistry) -> web.Application:
    async def put_rank(request: web.Request) -> web.Response:
        try:
            body = await request.json()
            reg = RankRegistration.model_validate(body)
            if str(reg.rank) != request.match_info["rank"]:
                raise ValueError(f"path says rank {request.match_info['rank']}, body says {reg.rank}")
            registry.register(reg)
        except (ValueError, ValidationError) as exc:
            return web.json_response({"error": str(exc)[:2000]}, status=400)
        return web.json_response({"ok": True})

    async def get_info(_: web.Request) -> web.Response:
        return web.json_response(registry.info())

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="OK")

    app = web.Application(client_max_size=64 * 1024)
    app.router.add_put("/kvlane/ranks/{rank}", put_rank)
    app.router.add_get("/kvlane/info", get_info)
    app.router.add_get("/health", health)
    return app


class BootstrapServerThread:
    """Serve `make_app` on host:port from a daemon thread (port 0 picks one; see `.port`)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.registry = BootstrapRegistry()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvlane-sgl-bootstrap", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(15.0)
        log.info("kvlane bootstrap server on http://%s:%d", self.host, self.port)

    async def _start(self) -> None:
        self._runner = web.AppRunner(make_app(self.registry), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self._runner.addresses:
            self.port = int(self._runner.addresses[0][1])

    def close(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5.0)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
