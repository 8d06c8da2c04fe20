"""Frontend role (rank 0): the OpenAI HTTP server (mmhpc.server.app) glued to the
`RemoteEngineClient` (mmhpc.roles.remote_client) that drives the worker ranks, and, where
rank 0 also hosts a worker (frontend_shares_rank=true), that worker's loop in a thread.

When a rank dies (mmhpc.roles.liveness) the server stops, and `run` aborts the MPI job after
the line naming the rank had time to reach the launcher. Workers leave SIGTERM to the
frontend (it drains, then sends Shutdown), so a closing connection is never a clean stop.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

from mmhpc.messages.common import Shutdown
from mmhpc.roles.remote_client import RemoteEngineClient

log = logging.getLogger(__name__)
ABORT_GRACE_S = 0.5             # the dead-rank line reaches the launcher before MPI_Abort


class FrontendProcessor:
    """The InputProcessor as the disaggregated frontend uses it: images are counted (token
    numbers, grids), not preprocessed; each decoded image rides its item (`MMItem.source`) to
    dispatch, and goes with the request (nothing kept beside it)."""

    def __init__(self, processor) -> None:
        self._processor = processor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._processor, name)

    def process(self, prompt: str, images=()):
        ids, items = self._processor.process(prompt, images, with_pixels=False)
        for item, image in zip(items, images):
            if item.embeddings is None:
                item.source = image
        return ids, items


def run(ctx, local=None) -> None:
    """Serve HTTP on this rank; `local`: the worker sharing it (its loop runs in a thread)."""
    import threading
    from mmhpc.multimodal.processor import InputProcessor
    from mmhpc.server.app import build_app, serve

    processor = InputProcessor(ctx.config.model.path)
    client = RemoteEngineClient(ctx, processor, local)
    fp = FrontendProcessor(processor)
    app = build_app(ctx.config, client, fp)
    app.router.add_get("/debug/ranks", client.debug_ranks)

    def ready(url: str) -> None:
        try:
            from mmhpc.launch.url_file import write_url_file
            write_url_file(url)
        except Exception:  # noqa: BLE001 - the URL file is a convenience
            pass

    async def main() -> None:
        client.shutdown = asyncio.Event()
        thread = None
        if local is not None:
            loop = asyncio.get_running_loop()

            def route(dest: int, msg) -> None:
                try:
                    loop.call_soon_threadsafe(client.route_from_local, dest, msg)
                except RuntimeError:            # the loop closed at shutdown
                    pass

            def beside() -> None:
                try:
                    local.run_beside_frontend(route)
                except BaseException as e:  # noqa: BLE001
                    log.exception("rank %d: %s loop failed", ctx.rank, ctx.role)
                    loop.call_soon_threadsafe(client.liveness.rank_dead, ctx.rank,
                                              f"its engine loop failed: {e!r}")

            thread = threading.Thread(target=beside, name=f"mmhpc-{ctx.role}", daemon=True)
            thread.start()
        try:
            await serve(ctx.config, client, fp, shutdown=client.shutdown, on_ready=ready,
                        app=app, note=ctx.layout.summary())
        finally:
            if thread is not None:
                local.stopping.set()
                local.inbox.put((ctx.rank, Shutdown("frontend stopped")))
                await asyncio.to_thread(thread.join, 10.0)

    asyncio.run(main())
    if client.dead:                  # outside asyncio: take every rank down
        sys.stderr.flush()
        # The launcher forwards rank 0's stderr through a pipe; MPI_Abort tears the job down
        # at once, and a busy launcher could drop the one line that says which rank died.
        time.sleep(ABORT_GRACE_S)
        ctx.comm.Abort(1)
