"""python -m sglx.launch_server: start the sglx HTTP server (SGLang's flags)."""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import List, Optional

from sglx.srt.server_args import ServerArgs, prepare_server_args

logger = logging.getLogger("sglx")


def bind_http_socket(host: str, port: int) -> socket.socket:
    """Bind the HTTP port before anything loads: a port in use fails in a second, not after the model has loaded
    (as it did when uvicorn bound it last), and nothing can take the port in between."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def launch_server(server_args: ServerArgs) -> None:
    import uvicorn

    from sglx.srt.entrypoints.engine import launch_subprocesses, start_watchdog
    from sglx.srt.entrypoints.http_server import build_app
    from sglx.srt.utils import configure_logger, kill_processes

    configure_logger(server_args)
    sock = bind_http_socket(server_args.host, server_args.port)
    tm, info, procs = launch_subprocesses(server_args)
    start_watchdog(procs, lambda: os._exit(1))
    app = build_app(tm, procs_alive=lambda: all(p.is_alive() for p in procs))
    logger.info("serving %s on http://%s:%d (KV pool %d tokens)", server_args.served_model_name,
                server_args.host, server_args.port, info["max_total_num_tokens"])
    try:
        config = uvicorn.Config(app, host=server_args.host, port=server_args.port,
                                log_level=server_args.log_level.lower(), timeout_keep_alive=5, loop="asyncio")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        kill_processes(procs)


def main(argv: Optional[List[str]] = None) -> None:
    try:
        server_args = prepare_server_args(sys.argv[1:] if argv is None else argv)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    try:
        launch_server(server_args)
    except RuntimeError as e:
        logging.getLogger("sglx").error("%s", e)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
