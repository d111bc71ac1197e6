"""Process launch shared by the HTTP server and the offline Engine, and the Engine itself."""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing as mp
import signal
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from sglx.srt.managers.io_struct import EmbeddingReqInput, GenerateReqInput, ProfileReq
from sglx.srt.server_args import ServerArgs
from sglx.srt.utils import PortArgs, kill_processes

logger = logging.getLogger(__name__)


def _child_entry(target, *args) -> None:
    # Ctrl-C goes to the whole process group; the launcher decides how children stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    target(*args)


def _run_scheduler(server_args, port_args, writer) -> None:
    from sglx.srt.managers.scheduler import run_scheduler_process

    _child_entry(run_scheduler_process, server_args, port_args, writer)


def _run_detokenizer(server_args, port_args) -> None:
    from sglx.srt.managers.detokenizer_manager import run_detokenizer_process

    _child_entry(run_detokenizer_process, server_args, port_args)


def launch_subprocesses(server_args: ServerArgs) -> Tuple[Any, Dict[str, Any], List[mp.Process]]:
    """Start the scheduler and detokenizer processes; return (TokenizerManager, scheduler info, processes)."""
    from sglx.srt.managers.tokenizer_manager import TokenizerManager

    server_args.check_launchable()
    port_args = PortArgs.init_new()
    ctx = mp.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    procs = [
        ctx.Process(target=_run_scheduler, args=(server_args, port_args, writer), name="sglx::scheduler"),
        ctx.Process(target=_run_detokenizer, args=(server_args, port_args), name="sglx::detokenizer"),
    ]
    for p in procs:
        p.start()
    atexit.register(kill_processes, procs)
    while not reader.poll(0.5):
        dead = [p for p in procs if not p.is_alive()]
        if dead:
            kill_processes(procs)
            raise RuntimeError(f"{dead[0].name} exited with code {dead[0].exitcode} during start-up (see log above)")
    info = reader.recv()
    if info.get("status") != "ready":
        kill_processes(procs)
        raise RuntimeError(f"scheduler failed to start: {info.get('error')}")
    tm = TokenizerManager(server_args, port_args, info)
    return tm, info, procs


def start_watchdog(procs: List[mp.Process], on_death, stopped: Optional[threading.Event] = None) -> threading.Thread:
    """A child that dies takes the whole server down with a clear log line, never a hang. Setting `stopped`
    (a deliberate shutdown) ends the watch first."""
    stopped = stopped or threading.Event()

    def watch() -> None:
        while not stopped.is_set():
            for p in procs:
                if not p.is_alive():
                    logger.error("%s died with exit code %s; shutting the server down", p.name, p.exitcode)
                    kill_processes(procs)
                    on_death()
                    return
            stopped.wait(0.5)

    t = threading.Thread(target=watch, name="sglx-watchdog", daemon=True)
    t.start()
    return t


class Engine:
    """In-process sglx: the same scheduler and detokenizer processes, without HTTP.

    >>> engine = Engine(max_total_tokens=4096)
    >>> engine.generate("Hello", {"max_new_tokens": 8, "temperature": 0})["text"]

    Embedding models (`Engine(model_path=..., is_embedding=True)`) answer `encode` instead.
    """

    def __init__(self, server_args: Optional[ServerArgs] = None, **kwargs: Any) -> None:
        self.server_args = server_args or ServerArgs(**kwargs)
        self.tokenizer_manager, self.scheduler_info, self.procs = launch_subprocesses(self.server_args)
        self.loop = asyncio.new_event_loop()
        self._dead = threading.Event()
        self._stopped = threading.Event()
        start_watchdog(self.procs, self._dead.set, self._stopped)

    def _check_alive(self) -> None:
        """Raise before any work is queued: on an engine that was shut down (its loop is closed) or whose
        process died."""
        if self._stopped.is_set():
            raise RuntimeError("this sglx engine has been shut down")
        if self._dead.is_set():
            raise RuntimeError("an sglx engine process died; see the log")

    def _run(self, coro):
        """Run `coro` on the engine's loop, but raise instead of waiting forever if a process dies meanwhile."""

        async def guarded():
            task = asyncio.ensure_future(coro)
            while not task.done():
                await asyncio.wait([task], timeout=0.2)
                if self._dead.is_set() and not task.done():
                    task.cancel()
                    raise RuntimeError("an sglx engine process died during the request; see the log")
            return task.result()

        return self.loop.run_until_complete(guarded())

    def generate(
        self,
        prompt: Optional[Union[str, List[str]]] = None,
        sampling_params: Optional[Union[Dict, List[Dict]]] = None,
        input_ids: Optional[Union[List[int], List[List[int]]]] = None,
        return_logprob: bool = False,
        top_logprobs_num: Optional[int] = None,
        stream: bool = False,
        logprob_start_len: Optional[Union[int, List[int]]] = None,
    ) -> Union[Dict, List[Dict], Iterator[Dict]]:
        """`logprob_start_len` (with return_logprob): also return the prompt's logprobs from that position on
        (meta_info["input_token_logprobs"]), as SGLang does."""
        self._check_alive()
        obj = GenerateReqInput(text=prompt, input_ids=input_ids, sampling_params=sampling_params,
                               return_logprob=return_logprob, top_logprobs_num=top_logprobs_num, stream=stream,
                               logprob_start_len=logprob_start_len)
        gen = self.tokenizer_manager.generate_request(obj)
        if stream:
            return self._iterate(gen)
        out = None

        async def drain():
            nonlocal out
            async for out in gen:
                pass

        self._run(drain())
        return out

    def encode(
        self,
        prompt: Optional[Union[str, List[str]]] = None,
        input_ids: Optional[Union[List[int], List[List[int]]]] = None,
        truncate: bool = False,
    ) -> Union[Dict, List[Dict]]:
        """{"embedding": [float, ...], "meta_info": {...}} for one input, a list of them for a list of inputs
        (all sent at once and batched by the scheduler). Bad input raises ValueError."""
        self._check_alive()
        obj = EmbeddingReqInput(text=prompt, input_ids=input_ids, truncate=truncate)
        return self._run(self.tokenizer_manager.embedding_request(obj))

    def _iterate(self, gen) -> Iterator[Dict]:
        while True:
            try:
                yield self._run(gen.__anext__())
            except StopAsyncIteration:
                return

    def flush_cache(self) -> bool:
        self._check_alive()
        return self._run(self.tokenizer_manager.flush_cache()).success

    def start_profile(self, output_dir: Optional[str] = None, num_steps: Optional[int] = None,
                      activities: Optional[List[str]] = None, record_shapes: bool = False,
                      with_stack: bool = False) -> str:
        """Start the scheduler's torch profiler; returns the trace path it will write (see
        managers/scheduler_profiler.py). With num_steps it stops by itself after that many batches."""
        return self._profile(ProfileReq("start", output_dir, num_steps, activities, record_shapes, with_stack))

    def stop_profile(self) -> str:
        """Stop the profiler and write its trace; returns the trace path."""
        return self._profile(ProfileReq("stop"))

    def _profile(self, req: ProfileReq) -> str:
        self._check_alive()
        res = self._run(self.tokenizer_manager.profile(req))
        if not res.success:
            raise RuntimeError(res.message)
        return res.trace_path

    def get_server_info(self) -> Dict[str, Any]:
        self._check_alive()
        state = self._run(self.tokenizer_manager.get_internal_state())
        return {**self.scheduler_info, "internal_state": state}

    def shutdown(self) -> None:
        self._stopped.set()  # first, so the watchdog does not report the deliberate kill as a death
        kill_processes(self.procs)
        # The tokenizer manager's receive loop is still pending on the engine's loop: cancel it and close the
        # loop, or asyncio reports "Task was destroyed but it is pending" at exit.
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending and not self.loop.is_closed():
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        if not self.loop.is_closed():
            self.loop.close()
        self.tokenizer_manager.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
