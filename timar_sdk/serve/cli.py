"""`timar-serve` and `timar-loadtest` (the `serve` extra)."""
from __future__ import annotations

import asyncio
import json
import os
import signal

import click

from timar_sdk.cli import BACKEND_HELP, tool, write_json
from timar_sdk.errors import install_hint

TOKEN_ENV = "TIMAR_SERVE_TOKEN"


def _need_serve_extra(command: str, e: ImportError) -> click.ClickException:
    missing = (e.name or str(e)).split(".")[0]
    return click.ClickException(f"{command} needs the serve extra ({missing} is missing): {install_hint('serve')}")


@tool("timar-serve")
@click.option("--bundle", default=None, type=click.Path(exists=True, file_okay=False),
              help="Bundle folder (default: the shipped bundle).")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "onnxruntime", "tensorrt", "torch"]), help=BACKEND_HELP)
@click.option("--threads", default=None, type=click.IntRange(min=1), help="Intra-op threads of the backend.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, type=click.IntRange(0, 65535), help="Port (0: any free one).")
@click.option("--max-sessions", default=64, show_default=True, type=click.IntRange(min=1),
              help="Conversations open at once; more are refused with HTTP 503.")
@click.option("--max-batch", default=None, type=click.IntRange(min=1), help="Turns per batched call (default: all ready).")
@click.option("--idle-timeout", "idle_timeout_s", default=60.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds without a message from a client before it is closed (code 4000).")
@click.option("--max-message-bytes", default=1 << 20, show_default=True, type=click.IntRange(min=1024),
              help="Largest message a client may send (larger: closed with code 1009).")
@click.option("--max-pending", default=32, show_default=True, type=click.IntRange(min=1),
              help="Messages queued for a client that does not read them before it is closed (code 4001).")
@click.option("--max-buffer-seconds", "max_buffer_s", default=20.0, show_default=True, type=click.FloatRange(min=1.0),
              help="Seconds of one speaker's input buffered without a turn completing; more is refused.")
@click.option("--max-steps", default=None, type=click.IntRange(min=1),
              help="Largest 'steps' setting a client may ask for (default: 4x the bundle's default).")
@click.option("--drain-timeout", "drain_timeout_s", default=10.0, show_default=True, type=click.FloatRange(min=0.1),
              help="On SIGTERM / ctrl-C: seconds to finish the turns in flight.")
@click.option("--send-buffer-bytes", default=65536, show_default=True, type=click.IntRange(min=0),
              help="Kernel send buffer per connection (0: the OS's autotuning).")
def serve_cmd(bundle, backend, threads, host, port, send_buffer_bytes, **limits):
    """Serve TIMAR conversations over WebSocket (docs/PROTOCOL.md) on ws://HOST:PORT/v1/conversation,
    with /healthz, /readyz and /metrics on the same port. Set the environment variable
    TIMAR_SERVE_TOKEN to require 'Authorization: Bearer <token>'. SIGTERM or ctrl-C finishes the
    turns in flight, then stops."""
    try:
        from timar_sdk.serve.config import ServeConfig
        from timar_sdk.serve.server import TimarServer, return_freed_caches_to_the_os
    except ImportError as e:
        raise _need_serve_extra("timar-serve", e) from e
    return_freed_caches_to_the_os()
    from timar_sdk.runtime.model import Model

    token = os.environ.get(TOKEN_ENV) or None
    config = ServeConfig(token=token, send_buffer_bytes=send_buffer_bytes or None, **limits)
    model = Model(bundle, backend=backend, threads=threads)
    server = TimarServer(model, config)
    if token is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: listening on {host} without auth; set {TOKEN_ENV} to require a bearer token", err=True)

    def listening(bound: int) -> None:
        click.echo(f"timar-serve: listening on ws://{host}:{bound}/v1/conversation (health /healthz, /readyz, "
                   f"metrics /metrics; {model.info['model_preset']} on {model.backend.name}; "
                   f"auth {'on' if token else 'off'})")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_shutdown)
        await server.run(host, port, listening)

    asyncio.run(main())
    click.echo("timar-serve: stopped")


@tool("timar-loadtest")
@click.option("--url", default=None, help="A running server's ws://host:port/v1/conversation "
                                          "(default: start timar-serve on 127.0.0.1 in a subprocess).")
@click.option("--bundle", default=None, type=click.Path(exists=True, file_okay=False),
              help="Without --url: the bundle of the server started here (default: the shipped bundle).")
@click.option("--clients", default=8, show_default=True, type=click.IntRange(min=1), help="Simulated clients.")
@click.option("--search", "search_mode", is_flag=True,
              help="Find the largest number of clients holding the budget (doubling, then bisection).")
@click.option("--budget-ms", default=300.0, show_default=True, type=click.FloatRange(min=1),
              help="Turn latency budget: p99 at most this, and no failed turn.")
@click.option("--seconds", default=60.0, show_default=True, type=click.FloatRange(min=2), help="Length of each trial.")
@click.option("--start-clients", default=4, show_default=True, type=click.IntRange(min=1), help="--search: first N.")
@click.option("--max-clients", default=128, show_default=True, type=click.IntRange(min=1), help="--search: largest N.")
@click.option("--step", default=2, show_default=True, type=click.IntRange(min=1), help="--search: precision in clients.")
@click.option("--max-batch", default=None, type=click.IntRange(min=1), help="Without --url: the server's --max-batch.")
@click.option("--soak", is_flag=True,
              help="Clients connecting and leaving for --seconds (each conversation 10 to 40 s): failed turns, "
                   "errors and the server's memory drift (last minute vs second minute; holds within 5 %).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--json-out", default=None, type=click.Path(dir_okay=False), help="Also write the JSON results here.")
def loadtest_cmd(url, bundle, clients, search_mode, budget_ms, seconds, start_clients, max_clients, step, max_batch,
                 soak, as_json, json_out):
    """Real-time clients (20 ms chunks of synthetic speech) against timar-serve: turn latency
    p50/p95/p99 (turn audio complete -> motion received), late and failed turns, the server's CPU
    and memory (from its /metrics). The token, if the server needs one, is read from
    TIMAR_SERVE_TOKEN."""
    try:
        from timar_sdk.serve import loadtest as lt
    except ImportError as e:
        raise _need_serve_extra("timar-loadtest", e) from e
    if search_mode and soak:
        raise click.UsageError("--search and --soak: choose one")
    token, proc = os.environ.get(TOKEN_ENV) or None, None
    if url is None:
        extra = ("--max-sessions", str(max(max_clients, clients) + 8))
        extra += ("--max-batch", str(max_batch)) if max_batch else ()
        proc, url = lt.start_server(bundle, extra=extra)
        click.echo(f"started timar-serve (pid {proc.pid}) on {url}", err=True)
    try:
        report = lambda r: None if as_json else click.echo(lt.describe(r))  # noqa: E731
        if soak:
            result = asyncio.run(lt.soak(url, clients, seconds, budget_ms, token=token))
            if not as_json:
                click.echo(lt.describe_soak(result))
        elif search_mode:
            result = asyncio.run(lt.search(url, budget_ms, seconds, start_clients, max_clients, step, token, report))
            if not as_json:
                click.echo(f"largest N holding p99 <= {budget_ms:g} ms with no failed turn: {result['largest_clients']}")
        else:
            result = asyncio.run(lt.run_trial(url, clients, seconds, budget_ms, token=token))
            report(result)
    finally:
        if proc is not None:
            lt.stop_server(proc)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    if json_out:
        write_json(json_out, result)
