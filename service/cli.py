"""`lmserve serve`: the HTTP server on uvicorn.

    lmserve serve --model checkpoints/default --host 127.0.0.1 --port 8000
    LMSERVE_MODEL=checkpoints/default LMSERVE_PORT=8000 lmserve serve

Every Settings field is a flag (--max-batch-size ...) and an env var (LMSERVE_MAX_BATCH_SIZE); a flag wins over
the env var, which wins over the default. SIGTERM (or Ctrl-C) stops taking connections, lets in-flight requests
finish for up to --shutdown-grace seconds, aborts the rest and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from service.settings import Settings


def _flag_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """(argparse type, extra add_argument kwargs) for a Settings field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if origin is typing.Literal:
        return str, {"choices": list(args)}
    if annotation is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if annotation is SecretStr:
        return str, {}
    return annotation if annotation in (int, float, str, Path) else str, {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmserve", description="lmserve: a small Transformer LM server")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the HTTP server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, field in Settings.model_fields.items():
        kind, extra = _flag_type(field.annotation)
        default = field.default.get_secret_value() if isinstance(field.default, SecretStr) else field.default
        shown = "none" if default is None else default
        if name == "model":
            shown = "checkpoints/default"
        help_text = f"{field.description} [env LMSERVE_{name.upper()}; default {shown}]"
        if kind is not None:
            extra["type"] = kind
            extra["metavar"] = name.split("_")[-1].upper() if "choices" not in extra else None
        serve.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=help_text, **extra)
    return parser


class RepeatLimit(logging.Filter):
    """Lets through at most `burst` records of one message template (logger, level, format string) per `interval`
    seconds, and notes how many were held back on the next one let through: a flood of one failure (a client
    storm, the open-file limit) must not fill the disk with the same traceback."""

    def __init__(self, burst: int = 5, interval: float = 10.0) -> None:
        super().__init__()
        self.burst, self.interval = burst, interval
        self._seen: dict[tuple[str, int, str], list[float]] = {}  # key -> [window start, let through, held back]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = record.created
        window = self._seen.get(key)
        if window is None or now - window[0] >= self.interval:
            held = int(window[2]) if window else 0
            if len(self._seen) > 10_000:  # many distinct messages: forget the old windows
                self._seen.clear()
            self._seen[key] = [now, 1, 0]
            if held:
                record.msg = f"{record.msg} [{held} more like this in the last {self.interval:g}s were not logged]"
            return True
        if window[1] < self.burst:
            window[1] += 1
            return True
        window[2] += 1
        return False


def _configure_logging(level: str) -> None:
    """Plain lines for the server's own logs, each message held to a few per 10 s; the access log is one JSON
    object per line, alone, every one kept."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RepeatLimit())
    access = logging.getLogger("lmserve.access")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.propagate = False


def serve(settings: Settings) -> int:
    from model.checkpoint import CheckpointError, load_config
    from service.api import http_server
    from service.app import create_app

    try:  # a wrong --model fails here, in a second, before anything starts
        if not settings.model.is_dir():
            raise CheckpointError("no such directory (give one with --model or LMSERVE_MODEL)")
        load_config(settings.model)
    except CheckpointError as e:
        print(f"lmserve: cannot serve {settings.model}: {e}", file=sys.stderr)
        return 1
    _configure_logging(settings.log_level)
    server: http_server.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True
    app = create_app(settings, on_fatal=stop)
    server = http_server.server(app, settings)

    # uvicorn re-raises the SIGTERM it caught once it has shut down; this handler turns that into exit status 0
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    return 1 if app.state.lmserve.error else 0


def parse_settings(argv: list[str] | None = None) -> Settings:
    """Settings from the command line over the environment; exits 2 with one line per bad value."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]  # `python -m service --port 9000` is `serve`, the only command
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        for error in e.errors():
            field = ".".join(str(x) for x in error["loc"])
            print(f"lmserve: --{field.replace('_', '-')} (or LMSERVE_{field.upper()}): {error['msg']}",
                  file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    sys.exit(serve(parse_settings(argv)))


if __name__ == "__main__":
    main()
