"""The aiohttp application and the ways to run it: in-process for tests, or as a process.

In-process servers bind port 0 so parallel tests never collide, and expose their live counters
without an HTTP round trip; the standalone server stops cleanly on SIGINT/SIGTERM so benchmarks
can start and stop it as a child process.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tmbatch.sim.config import (
    GET_ROUTES,
    POST_ROUTES,
    ROUTE_HEALTH,
    ROUTE_MODELS,
    ROUTE_RESET,
    ROUTE_STATS,
    ROUTE_VERSION,
    SimConfig,
)
from tmbatch.sim.gate import access_refusal
from tmbatch.sim.handlers import handle_post
from tmbatch.sim.replies import error_reply, json_reply
from tmbatch.sim.state import (
    STATE_KEY,
    SimState,
    new_state,
    next_id,
    note_auth,
    record_arrival,
    reset_state,
    stats_of,
)


def build_app(config: SimConfig, clock: Callable[[], float] = time.monotonic) -> web.Application:
    """Handlers are closures over one state object: cheaper than app-key lookups per request.
    `clock` is the accounting's (SimState.clock): a test's fake one moves time without sleep."""
    state = new_state(config, clock)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state
    models_body = orjson.dumps(
        {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "tensormesh"}
                for m in config.models
            ],
        }
    )
    version_body = orjson.dumps({"version": "tmbatch-sim 1"})
    for route in POST_ROUTES:
        app.router.add_post(route, _post_handler(state, route))
    app.router.add_get(ROUTE_MODELS, _get_handler(state, ROUTE_MODELS, models_body))
    app.router.add_get(ROUTE_HEALTH, _get_handler(state, ROUTE_HEALTH, None))
    app.router.add_get(ROUTE_VERSION, _get_handler(state, ROUTE_VERSION, version_body))
    _add_control_routes(app, state)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _post_handler(state: SimState, route: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await handle_post(request, state, route)

    return handler


def _get_handler(state: SimState, route: str, body: bytes | None) -> Handler:
    """A GET route: its fixed body (None: an empty 200) behind the same key check."""
    async def handler(request: web.Request) -> web.StreamResponse:
        now = state.clock()
        state.by_route[route]["received"] += 1
        note_auth(state, request.headers)
        refusal = access_refusal(state, request.headers, needs_key=False)
        if refusal is not None:
            record_arrival(state, route, "", now, refusal.status)
            return refusal
        record_arrival(state, route, "", now, 200)
        if body is None:
            return web.Response(status=200, headers={"x-request-id": next_id(state)})
        return json_reply(200, body, next_id(state))

    return handler


def _add_control_routes(app: web.Application, state: SimState) -> None:
    """The simulator's own routes (its counters, a reset) and what answers any other."""
    async def stats_handler(request: web.Request) -> web.Response:
        return json_reply(200, orjson.dumps(stats_of(state)), next_id(state))

    async def reset_handler(request: web.Request) -> web.Response:
        reset_state(state)
        return json_reply(200, b'{"reset": true}', next_id(state))

    async def fallback(request: web.Request) -> web.Response:
        path = request.path
        if path in POST_ROUTES or path in GET_ROUTES or path in (ROUTE_STATS, ROUTE_RESET):
            return error_reply(state, 405, f"Method {request.method} is not allowed on {path}.")
        refusal = access_refusal(state, request.headers, needs_key=False)
        if refusal is not None:
            return refusal
        return error_reply(state, 404, f"Unknown route {path}.")

    app.router.add_get(ROUTE_STATS, stats_handler)
    app.router.add_post(ROUTE_RESET, reset_handler)
    app.router.add_route("*", "/{tail:.*}", fallback)


# ----------------------------------------------------------------------------------------------
# Running


@dataclass
class SimServer:
    """A running simulator; `stats()` reads the live counters without an HTTP round trip."""

    url: str
    config: SimConfig
    _state: SimState = field(repr=False)
    _runner: web.AppRunner = field(repr=False)

    def stats(self) -> dict[str, Any]:
        return stats_of(self._state)

    def reset(self) -> None:
        reset_state(self._state)

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> SimServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def start_sim(config: SimConfig, host: str = "127.0.0.1", port: int = 0,
                    clock: Callable[[], float] = time.monotonic) -> SimServer:
    """Start on the running loop; port 0 lets the OS pick, so parallel tests never collide.
    A short shutdown timeout keeps stop() quick even when slow requests are still pending."""
    app = build_app(config, clock)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    url_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    return SimServer(
        url=f"http://{url_host}:{bound[1]}", config=config, _state=app[STATE_KEY], _runner=runner
    )


def run_sim_forever(config: SimConfig, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, then close listeners and connections cleanly."""

    async def main() -> None:
        server = await start_sim(config, host, port)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"tmbatch sim listening on {server.url}", file=sys.stderr, flush=True)
        try:
            await stop.wait()
        finally:
            await server.stop()

    asyncio.run(main())
