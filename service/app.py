"""The FastAPI app, kept thin: lifespan (load, warm up, stop), middleware, error handlers and routers.

    app = create_app(Settings(model="checkpoints/default"))   # then run it with uvicorn (see service/cli.py)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware import Middleware

from service.api import ROUTERS
from service.api.errors import install_error_handlers
from service.api.lifecycle import ServerState
from service.api.middleware import AccessLog, ApiKey, BodyLimit
from service.api.openapi import document_errors
from service.engine.engine import Engine
from service.settings import Settings

DESCRIPTION = """A small Transformer language-model server.

Errors are always `{"error": {"message", "type", "param", "code"}}`; `param` names the field at fault.
"""


def create_app(settings: Settings | None = None, engine: Engine | None = None, *,
               loader: Callable[[Settings], Engine] | None = None,
               on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """The app for `settings`. It serves `engine` if given (started if need be), else the engine `loader` builds
    (default: the checkpoint at settings.model), loaded in the background after startup; `on_fatal` is called if
    loading fails (the CLI stops the server then). The engine is shut down with the app."""
    settings = settings or Settings()
    state = ServerState(settings, engine, loader, on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        yield
        await state.stop()

    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    app = FastAPI(title="lmserve", description=DESCRIPTION, version="0.1.0", lifespan=lifespan, middleware=[
        Middleware(AccessLog, metrics=state.metrics),
        Middleware(ApiKey, api_key=api_key),
        Middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout=settings.body_timeout),
    ])
    app.state.lmserve = state
    install_error_handlers(app)
    document_errors(app)
    for router in ROUTERS:
        app.include_router(router)
    return app
