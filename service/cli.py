"""``captioner-serve``: run the service under uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

import uvicorn
from pydantic import ValidationError
from starlette.types import Message, Receive, Scope, Send

from service.app import create_app
from service.settings import Settings


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "captioner-serve",
        description="Serve the captioning model over HTTP. Other settings come from CAPTIONER_* environment "
        "variables (CAPTIONER_MAX_UPLOAD_BYTES, CAPTIONER_MAX_BATCH_SIZE, CAPTIONER_API_KEYS, ...).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument("--checkpoint", help="checkpoint file (default: CAPTIONER_CHECKPOINT, else the bundled model)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: CAPTIONER_DEVICE, else cpu)")
    parser.add_argument(
        "--backend",
        choices=["auto", "torch", "onnxruntime"],
        help="onnxruntime (CPU) or torch; auto: onnxruntime on CPU when installed (default: CAPTIONER_BACKEND, "
        "else auto)",
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument(
        "--no-access-log", dest="access_log", action="store_false", help="do not log a line per request"
    )
    return parser


class _OneLineStartupError:
    """Replace the traceback uvicorn prints for a failed model load with the load error's one line."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_short(message: Message) -> None:
            error = self.app.state.startup_error
            if message["type"] == "lifespan.startup.failed" and error:
                message = {**message, "message": error}
            await send(message)

        await self.app(scope, receive, send_short)


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    given = {"checkpoint": args.checkpoint, "device": args.device, "backend": args.backend}
    overrides = {k: v for k, v in given.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        parser.error(f"invalid settings: {errors}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        _OneLineStartupError(app),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: a clean exit
        pass
    except SystemExit as exc:  # uvicorn exits with status 3 when startup fails (the error is already logged)
        return exc.code if isinstance(exc.code, int) and exc.code else 1
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
