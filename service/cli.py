"""``captioner-serve``: run the service under uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import Any

import uvicorn
from pydantic import ValidationError
from starlette.types import Message, Receive, Scope, Send

from service.app import create_app
from service.errors import error_response
from service.http_protocol import guarded_h11_protocol
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
        "--access-log",
        choices=["text", "json", "off"],
        help="a line per request: text (uvicorn's), json (one object with the request id), off (default: "
        "CAPTIONER_ACCESS_LOG, else text)",
    )
    parser.add_argument(
        "--no-access-log", dest="access_log", action="store_const", const="off", help="--access-log off"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show what is quiet by default: the output of the libraries a first-start ONNX export uses, "
        "the captioner's debug lines, and uvicorn's shutdown lines on Ctrl-C",
    )
    return parser


INTERRUPTED = "captioner-serve: interrupted"  # the one line Ctrl-C prints; the exit status is 130


class _DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, mark the app draining (``/ready`` and new requests answer 503) before uvicorn's
    graceful shutdown, which stops listening, lets requests in progress finish within
    ``shutdown_grace_s`` and then exits.

    Ctrl-C (SIGINT) is a person at a terminal: it drains as quietly as it can (uvicorn's shutdown lines only
    with ``verbose``), and ``main`` then prints one line. Ctrl-C while the model still loads stops at once."""

    def __init__(self, config: uvicorn.Config, app: Any, *, verbose: bool = False) -> None:
        super().__init__(config)
        self.captioner_app = app
        self.verbose = verbose
        self.interrupted = False

    def handle_exit(self, sig: int, frame: Any) -> None:
        if sig == signal.SIGINT and not self.started:
            # The model loads on the model thread, perhaps through a first-start ONNX export of many seconds that
            # cannot be interrupted; uvicorn would wait for it, then start serving, then stop. Stop now: nothing
            # is served yet, and the next start clears the export's temporary folder (captioner.onnx_backend).
            print(INTERRUPTED, file=sys.stderr, flush=True)
            os._exit(130)
        if sig == signal.SIGINT:
            self.interrupted = True
            if not self.verbose:
                logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # a stalled request still warns
        if not self.captioner_app.state.draining:
            self.captioner_app.state.draining = True
            if not self.interrupted:
                logging.getLogger(__name__).info("draining: refusing new requests, finishing those in progress")
        super().handle_exit(sig, frame)


class _AnswerCancelledRequests:
    """When the shutdown grace period is over, uvicorn cancels the requests still in progress: answer each
    with a 503 (a balancer retries it on another replica) and a log line, instead of a dropped connection
    and a traceback."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        responded = False

        async def send_tracking(message: Message) -> None:
            nonlocal responded
            responded = responded or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except asyncio.CancelledError:
            if not self.app.state.draining:
                raise
            logging.getLogger(__name__).warning(
                "shutdown grace period over: gave up on %s %s", scope["method"], scope["path"]
            )
            if not responded:
                message = "the server shut down before the request finished; retry (on another replica)"
                response = error_response(503, "draining", message, {"Retry-After": "1", "Connection": "close"})
                with contextlib.suppress(Exception):
                    await response(scope, receive, send)


def _configure_logging(level: str, access_log: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    access = logging.getLogger("captioner.access")
    if access_log == "json":  # the record is the whole line: one JSON object, nothing around it
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False


class _OneLineStartupError:
    """Replace the traceback uvicorn prints for a failed model load with the load error's one line."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_short(message: Message) -> None:
            error = self.app.app.state.startup_error
            if message["type"] == "lifespan.startup.failed" and error:
                message = {**message, "message": error}
            await send(message)

        await self.app(scope, receive, send_short)


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    given = {
        "checkpoint": args.checkpoint,
        "device": args.device,
        "backend": args.backend,
        "access_log": args.access_log,
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        parser.exit(2, f"{parser.prog}: invalid settings: {errors}\n")  # one line: no usage summary above it
    _configure_logging(args.log_level, settings.access_log)
    if args.verbose:  # captioner.onnx_export then lets the exporter's libraries talk
        logging.getLogger("captioner").setLevel(logging.DEBUG)
    app = create_app(settings)
    config = uvicorn.Config(
        _OneLineStartupError(_AnswerCancelledRequests(app)),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=settings.access_log == "text",
        lifespan="on",
        http=guarded_h11_protocol(settings.header_timeout_s, settings.max_connections),  # see service.http_protocol
        h11_max_incomplete_event_size=settings.max_header_bytes,
        # uvicorn annotates an int but waits with asyncio, which takes the float as it is
        timeout_graceful_shutdown=settings.shutdown_grace_s,  # type: ignore[arg-type]
        # X-Forwarded-For/-Proto only from CAPTIONER_TRUSTED_PROXIES: uvicorn's own default believes them from
        # loopback, so any local client could choose the address that is logged
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies,
    )
    server = _DrainingServer(config, app, verbose=args.verbose)
    # uvicorn re-raises the signal it shut down on, once its own handlers are gone: a drained SIGTERM is a
    # clean stop (exit 0, as orchestrators expect), not a death by signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run()
    except KeyboardInterrupt:  # ... and Ctrl-C arrives as KeyboardInterrupt, after the drain
        server.interrupted = True
    except SystemExit as exc:  # uvicorn exits with status 3 when startup fails (the error is already logged)
        return exc.code if isinstance(exc.code, int) and exc.code else 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    if server.interrupted:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
