"""Aggregated role for `deployment.aggregated.instances > 1` (one instance alone is served by
`LocalEngineClient` on rank 0, see mmhpc.launch.main). Each instance runs the whole engine;
the frontend's RemoteEngineClient routes requests to the least loaded one:

    GenerateRequest (prompt ids + images as bytes, embeddings files by path or bytes) →
    preprocess / load → engine.add_request →
    continuous batching → TokenStream(stage="aggregated") per step → the frontend.
AbortRequest or the request's deadline frees its blocks. Instance 0 may share rank 0 with
the frontend (`deployment.frontend_shares_rank=true`): its loop runs in a thread there.
"""
from __future__ import annotations

import logging
import time

from mmhpc.engine.interface import make_engine
from mmhpc.messages.common import AbortRequest, Shutdown
from mmhpc.messages.to_aggregated import GenerateRequest
from mmhpc.messages.to_frontend import RequestFailed
from mmhpc.multimodal.image_items import media_item
from mmhpc.roles.worker import Worker, frontend_hashes, run_worker

log = logging.getLogger(__name__)


class AggregatedWorker(Worker):
    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.engine = make_engine(ctx.config, "aggregated", device=ctx.device, detokenize=False)
        self.processor = self.engine.processor
        self.hidden_size = self.engine.hidden_size
        self.deepstack = self.engine.deepstack_levels
        self.requests: dict[str, GenerateRequest] = {}

    def handle(self, src: int, msg) -> None:
        if isinstance(msg, GenerateRequest):
            self._add(msg)
        elif isinstance(msg, AbortRequest):
            self.requests.pop(msg.request_id, None)
            self.engine.abort_request(msg.request_id)
        elif not isinstance(msg, Shutdown):
            log.warning("aggregated rank %d: unexpected %s", self.rank, type(msg).__name__)

    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def tick(self) -> None:
        now = time.time()
        for rid, req in list(self.requests.items()):
            if now > req.deadline:
                self._fail(req, "deadline passed", timeout=True)
        if self.engine.has_unfinished_requests():
            self.stream_step(self.engine, self.requests, "aggregated", "engine error")
        self.stats = dict(self.engine.stats(), num_in_flight=len(self.requests), **self.counts)

    def _add(self, req: GenerateRequest) -> None:
        try:
            items = [media_item(self.processor, img, self.ctx.config, self.hidden_size,
                                self.deepstack)
                     for img in req.images]
            self.engine.add_request(req.request_id, req.prompt_token_ids, req.params, items,
                                    block_hashes=frontend_hashes(req, self.engine))
        except Exception as e:  # noqa: BLE001 - a bad request fails alone
            self._fail(req, f"{type(e).__name__}: {e}")
            return
        self.requests[req.request_id] = req

    def _fail(self, req: GenerateRequest, message: str, timeout: bool = False) -> None:
        self.requests.pop(req.request_id, None)
        self.engine.abort_request(req.request_id)
        self.send(req.frontend_rank, RequestFailed(req.request_id, self.rank, "aggregated",
                                                   message, timeout))


def setup(ctx) -> None:
    ctx.worker = AggregatedWorker(ctx)


def run(ctx) -> None:
    run_worker(ctx)
