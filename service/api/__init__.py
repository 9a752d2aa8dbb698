"""The API's routers: lmserve's own endpoints, the OpenAI-compatible ones, and operations."""

from service.api import native, openai, system

ROUTERS = (native.router, openai.router, system.router)
