"""python -m sglx.launch_server: start the sglx HTTP server (SGLang's flags)."""

from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

from sglx.srt.server_args import ServerArgs, prepare_server_args

logger = logging.getLogger("sglx")


def launch_server(server_args: ServerArgs) -> None:
    import uvicorn

    from sglx.srt.entrypoints.engine import launch_subprocesses, start_watchdog
    from sglx.srt.entrypoints.http_server import build_app
    from sglx.srt.utils import configure_logger, kill_processes

    configure_logger(server_args)
    tm, info, procs = launch_subprocesses(server_args)
    start_watchdog(procs, lambda: os._exit(1))
    app = build_app(tm, procs_alive=lambda: all(p.is_alive() for p in procs))
    logger.info("serving %s on http://%s:%d (KV pool %d tokens)", server_args.served_model_name,
                server_args.host, server_args.port, info["max_total_num_tokens"])
    try:
        uvicorn.run(app, host=server_args.host, port=server_args.port, log_level=server_args.log_level.lower(),
                    timeout_keep_alive=5, loop="asyncio")
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
