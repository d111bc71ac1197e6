"""Process, socket and logging helpers shared by the server's processes."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any, List

import zmq


@dataclass(frozen=True)
class PortArgs:
    """IPC endpoints: tokenizer -> scheduler, scheduler -> detokenizer, detokenizer/scheduler -> tokenizer."""

    scheduler_input_ipc: str
    detokenizer_ipc: str
    tokenizer_ipc: str

    @staticmethod
    def init_new() -> "PortArgs":
        base = os.path.join(tempfile.gettempdir(), f"sglx_{uuid.uuid4().hex[:12]}")
        return PortArgs(f"ipc://{base}_sched", f"ipc://{base}_detok", f"ipc://{base}_tok")

    def paths(self) -> List[str]:
        return [a[len("ipc://"):] for a in (self.scheduler_input_ipc, self.detokenizer_ipc, self.tokenizer_ipc)]


def partial_prefix_len(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is a proper prefix of `tag` (text that may still become
    `tag` once more arrives)."""
    if not tag:
        return 0
    # Candidate starts are the places of tag's first character among the last len(tag) - 1 characters; the
    # earliest that matches gives the longest end. (Trying every length instead costs O(len(text) * len(tag)).)
    p = text.find(tag[0], max(0, len(text) - len(tag) + 1))
    while p != -1:
        if tag.startswith(text[p:]):
            return len(text) - p
        p = text.find(tag[0], p + 1)
    return 0


def get_zmq_socket(ctx: zmq.Context, kind: int, endpoint: str, bind: bool) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if kind == zmq.PUSH:
        sock.setsockopt(zmq.SNDHWM, 0)
    if kind == zmq.PULL:
        sock.setsockopt(zmq.RCVHWM, 0)
    (sock.bind if bind else sock.connect)(endpoint)
    return sock


def set_parent_death_signal() -> None:
    """Linux: the child gets SIGKILL when its parent dies, so a crashed launcher never leaves orphans."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def configure_logger(server_args: Any, prefix: str = "") -> None:
    fmt = f"[%(asctime)s{' ' + prefix if prefix else ''}] %(levelname)s %(message)s"
    logging.basicConfig(level=getattr(logging, str(server_args.log_level).upper(), logging.INFO), format=fmt,
                        datefmt="%Y-%m-%d %H:%M:%S", force=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_processes(procs: List[Any], timeout: float = 5.0) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join(1)
