"""Run the gateway: under uvicorn in the foreground (``distillscope serve``) or in a thread."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from distillscope.errors import DistillscopeError


@dataclass
class GatewayConfig:
    """Everything ``distillscope serve`` sets. ``teacher`` is a teacher spec, or ``upstream`` an
    OpenAI-compatible URL to proxy (then ``teacher`` is ignored)."""

    teacher: str = "default"
    upstream: str | None = None
    upstream_model: str | None = None
    upstream_key: str | None = None
    model_name: str | None = None
    db: str | None = "traffic.duckdb"
    keys: str | None = "gateway-keys.sqlite"
    tiers: str | None = None
    limits: str | None = None
    block_file: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    log_batch: int = 512
    log_wait_ms: float = 0.0
    #: the proxy student of tiers with ``antidistill:`` (built once, when a tier needs it)
    antidistill_proxy: str = "layers:2"
    #: the prompt pool (a name or a file) whose teacher answers are the proxy's downstream set
    antidistill_prompts: str = "sharegpt"
    #: server processes, each with its own teacher; more than one needs a log and limits that
    #: processes share (PostgreSQL, Redis)
    workers: int = 1
    #: the watch's state folder the console reads alerts from (its log: ``db``)
    watch_state: str | None = "watch"
    #: where the console looks for radioactivity evidence reports (``radioactivity --out``)
    evidence: str | None = "evidence"
    #: requests a local teacher answers together in one batch (1: one at a time)
    max_batch: int = 16

    def check_workers(self) -> None:
        """Refuse, in one line, what several processes cannot share."""
        if self.workers < 1:
            raise DistillscopeError(f"--workers must be at least 1, not {self.workers}")
        if self.workers == 1:
            return
        if self.db and not self.db.startswith(("postgresql://", "postgres://")):
            raise DistillscopeError(
                f"--workers {self.workers}: a DuckDB file has one writer; give the processes a "
                "shared log with --db postgresql://... (or --db off)"
            )
        if not (self.limits or "memory").startswith(("redis://", "rediss://")):
            raise DistillscopeError(
                f"--workers {self.workers}: in-memory rate limits would give each key "
                f"{self.workers}x its budget; share them with --limits redis://..."
            )


def build_gateway(config: GatewayConfig) -> tuple[FastAPI, object]:
    """The app a config describes, and its traffic log (closed by whoever runs the app)."""
    from distillscope.gateway.app import create_app
    from distillscope.gateway.backends import ProxyBackend, TeacherBackend
    from distillscope.gateway.keys import KeyStore
    from distillscope.gateway.limits import open_limiter
    from distillscope.gateway.tiers import antidistilled, load_tiers
    from distillscope.gateway.traffic import open_traffic_log
    from distillscope.teachers import load_teacher

    # the admin API's key comes from the environment, never from an argument others can read
    admin_key = os.environ.get("DISTILLSCOPE_ADMIN_KEY") or None
    if admin_key is not None:
        from distillscope.gateway.admin import admin_digest

        if not config.keys:
            raise DistillscopeError(
                "DISTILLSCOPE_ADMIN_KEY is set but the gateway is open (--open): the admin API "
                "manages a key store"
            )
        admin_digest(admin_key)  # a weak admin key is refused before anything starts
    watermarks = {}
    if os.environ.get("DISTILLSCOPE_WATERMARK_SECRET"):
        # per-account keys derive from the provider's master secret; tiers may then name
        # `watermark: kgw` or `watermark: gumbel` (docs/forensics.md)
        from distillscope.forensics.watermark import gateway_watermarks

        watermarks = gateway_watermarks(context=_watermark_context())
    tiers = load_tiers(config.tiers, watermarks=watermarks)
    defended = antidistilled(tiers)
    if defended and config.upstream:
        raise DistillscopeError(
            f"tier(s) {', '.join(defended)} set antidistill, which steers a local teacher's "
            "sampling: it cannot be applied to a proxied upstream"
        )
    antidistillation = None
    keys = KeyStore(config.keys) if config.keys else None
    if config.upstream:
        backend = ProxyBackend(
            config.upstream,
            api_key=config.upstream_key or os.environ.get("UPSTREAM_API_KEY"),
            model=config.upstream_model,
            model_name=config.model_name,
        )
    else:
        teacher = load_teacher(config.teacher, device=config.device, batch_size=1)
        backend = TeacherBackend(
            teacher,
            model_name=config.model_name or _served_name(config.teacher),
            max_batch=config.max_batch,
        )
        if defended:
            antidistillation = _antidistillation(
                teacher, config.antidistill_proxy, config.antidistill_prompts
            )
    limiter = open_limiter(config.limits)
    log = open_traffic_log(config.db, batch_size=config.log_batch, max_wait_ms=config.log_wait_ms)
    log.start()
    from distillscope.gateway.console import ConsoleConfig

    console = ConsoleConfig(
        watch_log=config.db,
        watch_state=config.watch_state,
        block_file=config.block_file,
        evidence=config.evidence,
    )
    app = create_app(
        backend, keys=keys, log=log, limiter=limiter, tiers=tiers, block_file=config.block_file,
        antidistillation=antidistillation, watermarks=watermarks, admin_key=admin_key,
        console=console,
    )  # fmt: skip
    return app, log


def _watermark_context() -> int:
    """The gateway watermarks' context width h: ``$DISTILLSCOPE_WATERMARK_CONTEXT``, default 4.

    h = 1 is what a small copy learns well enough for the closed-model radioactivity test
    (benchmarks/forensics.md); it is also easier to estimate from outputs.
    """
    raw = os.environ.get("DISTILLSCOPE_WATERMARK_CONTEXT", "4")
    try:
        context = int(raw)
    except ValueError:
        context = 0
    if context < 1:
        raise DistillscopeError(
            f"DISTILLSCOPE_WATERMARK_CONTEXT={raw!r}: the context width must be an integer >= 1"
        )
    return context


def _antidistillation(teacher, proxy: str, prompts: str = "sharegpt", n: int = 16):
    """The gateway's one antidistillation proxy: ``proxy`` with its downstream loss on the
    teacher's answers to ``n`` prompts drawn from the pool ``prompts`` (all of them, if fewer): the
    provider's own set of what its users ask, ideally."""
    from distillscope.forensics.defenses import build_antidistillation
    from distillscope.prompts import load_prompts, select_prompts

    if not hasattr(teacher, "model"):
        raise DistillscopeError(
            "tiers with antidistill need a transformers teacher (default or hf:PATH): "
            "the proxy student is built from its weights"
        )
    try:
        pool = load_prompts(prompts)
        pool = [p.text for p in select_prompts(pool, min(n, len(pool)), seed=0)]
    except DistillscopeError as exc:
        raise DistillscopeError(f"--antidistill-prompts {prompts}: {exc}") from None
    serving = teacher.batch_size
    teacher.batch_size = max(serving, len(pool))  # the gateway serves one at a time; build at once
    try:
        return build_antidistillation(
            teacher, lam=0.0, proxy=proxy, prompts=len(pool), prompt_pool=pool
        )
    except DistillscopeError as exc:
        raise DistillscopeError(f"--antidistill-proxy {proxy!r}: {exc}") from None
    finally:
        teacher.batch_size = serving


def _served_name(spec: str) -> str:
    if spec in ("default", "synthetic"):
        return f"distillscope-{spec}"
    return Path(spec.split(":", 1)[-1]).name or spec


#: where ``run_gateway`` hands its config to worker processes (JSON of ``GatewayConfig``)
_CONFIG_ENV = "DISTILLSCOPE_GATEWAY_CONFIG"


def worker_app() -> FastAPI:
    """One worker's app (uvicorn's factory for ``serve --workers N``): the gateway of the config
    in ``$DISTILLSCOPE_GATEWAY_CONFIG``, its traffic log closed when the worker stops."""
    config = GatewayConfig(**json.loads(os.environ[_CONFIG_ENV]))
    app, log = build_gateway(config)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(running):
        async with inner(running):
            yield
        log.close()

    app.router.lifespan_context = lifespan
    return app


def run_gateway(config: GatewayConfig, on_ready: Callable[[], None] | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM; the traffic log is drained and closed on the way out.

    ``on_ready()`` is called once the gateway answers: the teacher loaded and the port listening
    (with several workers: once ``/health`` answers).
    """
    config.check_workers()
    _check_port(config.host, config.port)
    if config.workers > 1:
        _run_workers(config, on_ready)
        return
    app, log = build_gateway(config)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=config.host, port=config.port, log_level="warning", access_log=False
        )
    )
    if on_ready is not None:
        threading.Thread(target=_when_started, args=(server, on_ready), daemon=True).start()
    try:
        server.run()
    finally:
        log.close()


def _run_workers(config: GatewayConfig, on_ready: Callable[[], None] | None) -> None:
    """``config.workers`` uvicorn worker processes on one port, each building its own gateway."""
    os.environ[_CONFIG_ENV] = json.dumps(asdict(config))
    if on_ready is not None:
        threading.Thread(target=_when_healthy, args=(config, on_ready), daemon=True).start()
    uvicorn.run(
        "distillscope.gateway.server:worker_app",
        factory=True,
        host=config.host,
        port=config.port,
        workers=config.workers,
        log_level="warning",
        access_log=False,
    )


def _when_healthy(config: GatewayConfig, then: Callable[[], None], timeout: float = 600) -> None:
    import httpx

    url = f"http://{config.host}:{config.port}/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                then()
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)


def _when_started(server: uvicorn.Server, then: Callable[[], None]) -> None:
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    then()


def _check_port(host: str, port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise DistillscopeError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


@contextmanager
def serve_in_thread(app: FastAPI, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` on ``host:port`` (0: a free port) until the block ends; yield its base URL."""
    sock = socket.socket()
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start within 10 s")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
