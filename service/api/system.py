"""Operations endpoints: /health (liveness), /ready (readiness), /metrics (Prometheus), /info, and /."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from service.api.deps import ServingDep
from service.api.errors import APIError
from service.api.lifecycle import ServerState
from service.api.schemas import ErrorResponse, error_responses
from service.engine.request import MAX_STOP_STRINGS
from service.engine.sampling import MAX_LOGPROBS

router = APIRouter(tags=["operations"])
NOT_OK = error_responses(503)
DEAD = {503: {"model": ErrorResponse, "description": "the model failed to load (load_failed) or the engine thread "
                                                     "died (engine_dead)"}}


def _state(request: Request) -> ServerState:
    return request.app.state.lmserve


PLAYGROUND = Path(__file__).resolve().parent / "static" / "playground.html"


@functools.cache
def _playground_html() -> str:
    return PLAYGROUND.read_text(encoding="utf-8")  # read once, on the first visit


@router.get("/", summary="The web playground", include_in_schema=False)
async def playground() -> HTMLResponse:
    """One static page, everything inline (no CDN, no build step): next-token bars, temperature, generate."""
    return HTMLResponse(_playground_html())


@router.get("/health", summary="Liveness: 200 while the process and its engine work", responses={
    200: {"content": {"application/json": {"example": {"status": "ok", "model_status": "ready"}}}}, **DEAD})
async def health(request: Request) -> JSONResponse:
    """503 with the reason when the model failed to load or the engine thread died; 200 otherwise, also while
    the model is still loading (use /ready to know when to send traffic)."""
    state = _state(request)
    if state.error:
        raise APIError(503, f"the model failed to load: {state.error}", code="load_failed")
    if state.serving is not None and not state.serving.engine.alive and state.status != "stopping":
        raise APIError(503, state.serving.engine.dead_reason or "the engine thread is not running",
                       code="engine_dead")
    return JSONResponse({"status": "ok", "model_status": state.status})


@router.get("/ready", summary="Readiness: 200 once the model is loaded and warmed up", responses={
    200: {"content": {"application/json": {"example": {"status": "ready"}}}}, **NOT_OK})
async def ready(_: ServingDep) -> JSONResponse:
    """503 with Retry-After while the model loads or warms up, after it failed, once the engine died, or while
    shutting down: exactly when the generation routes would answer 503."""
    return JSONResponse({"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, responses={
    200: {"content": {"text/plain": {"example": "lmserve_requests_running 3.0\nlmserve_requests_waiting 0.0\n"}}}})
async def metrics(request: Request) -> Response:
    body, content_type = _state(request).metrics.render()
    return Response(body, media_type=content_type)


@router.get("/info", summary="The model, its config.json fields, and the server's limits", responses={
    200: {"content": {"application/json": {"example": {
        "model": "default", "path": "checkpoints/default", "parameters": 1234567, "dtype": "float32",
        "device": "cpu", "cpu_kernels": True,
        "backend": {"prefill": "cpu-kernels", "decode": "cpu-decode-step", "decode_fallback_reason": None},
        "is_encoder_decoder": False,
        "config": {"vocab_size": 1024, "hidden_size": 256},
        "limits": {"max_seq_len": 1024, "max_batch_size": 32}}}}}, **NOT_OK})
async def info(serving: ServingDep) -> JSONResponse:
    """`backend` says which compute path runs prefill and decode (and, when decode is not on the fastest path
    this machine has, why)."""
    engine, settings = serving.engine, serving.settings
    body: dict[str, Any] = {
        "model": serving.name, "path": str(engine.checkpoint_path), "parameters": engine.runner.num_parameters,
        "dtype": str(engine.runner.dtype).removeprefix("torch."), "device": str(engine.device),
        "cpu_kernels": engine.runner.cpu_kernels,
        "backend": engine.runner.backend_info,
        "is_encoder_decoder": engine.is_encoder_decoder,
        "config": engine.model_config.to_dict(),
        "generation_defaults": serving.defaults,
        "limits": {"max_seq_len": serving.max_seq_len, "max_batch_size": engine.config.max_batch_size,
                   "max_queue": engine.config.max_queue, "max_prefill_tokens": engine.config.max_prefill_tokens,
                   "max_prompts": settings.max_prompts, "max_body_bytes": settings.max_body_bytes,
                   "request_timeout": settings.request_timeout, "max_logprobs": MAX_LOGPROBS,
                   "max_stop_strings": MAX_STOP_STRINGS},
        "auth": settings.api_key is not None,
    }
    return JSONResponse(body)
