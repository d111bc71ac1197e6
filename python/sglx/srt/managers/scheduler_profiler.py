"""The scheduler's torch profiler: /start_profile and /stop_profile (SGLang's endpoints), one trace per span.

A span starts on a ProfileReq("start") and ends on a ProfileReq("stop") or, when `num_steps` was given, by
itself after that many scheduler steps that ran a batch. Its Chrome trace (open it in Perfetto or
chrome://tracing) is written to `output_dir` (default: $SGLX_TORCH_PROFILER_DIR, else /tmp) as
`sglx-<time>-pid<pid>.trace.json.gz`. While a span runs, `annotate(name)` marks the scheduler's phases
(receive, schedule, launch, process results) as CPU ranges in the trace, so a gap on the GPU timeline can be
read against what the scheduler was doing; outside a span it costs one attribute check.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, ContextManager, List, Optional

import torch

from sglx.srt.managers.io_struct import ProfileReq, ProfileReqOutput

logger = logging.getLogger(__name__)

PROFILER_DIR_ENV = "SGLX_TORCH_PROFILER_DIR"
ACTIVITIES = ("CPU", "GPU")
_NULL = contextlib.nullcontext()


def default_output_dir() -> str:
    return os.environ.get(PROFILER_DIR_ENV) or "/tmp"


class SchedulerProfiler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.prof: Optional[Any] = None
        self.path: Optional[str] = None
        self.steps_left: Optional[int] = None

    @property
    def active(self) -> bool:
        return self.prof is not None

    def handle(self, req: ProfileReq) -> ProfileReqOutput:
        if req.action == "start":
            return self.start(req)
        if req.action == "stop":
            return self.stop()
        return ProfileReqOutput(False, f"unknown profile action {req.action!r} (start | stop)")

    def start(self, req: ProfileReq) -> ProfileReqOutput:
        from torch.profiler import ProfilerActivity, profile

        if self.active:
            return ProfileReqOutput(False, f"already profiling (trace to {self.path}); stop it first")
        names = [a.upper() for a in (ACTIVITIES if req.activities is None else req.activities)]
        if not names or any(a not in ACTIVITIES for a in names):
            return ProfileReqOutput(False, f"activities must be a non-empty subset of {list(ACTIVITIES)}")
        if req.num_steps is not None and req.num_steps < 1:
            return ProfileReqOutput(False, "num_steps must be a positive integer")
        out_dir = req.output_dir or default_output_dir()
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            return ProfileReqOutput(False, f"cannot create the output directory {out_dir!r}: {e}")
        activities: List[Any] = [ProfilerActivity.CPU] if "CPU" in names else []
        if "GPU" in names and self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        if not activities:
            return ProfileReqOutput(False, "GPU profiling asked for, but this scheduler runs on the CPU")
        self.path = os.path.join(out_dir, f"sglx-{time.strftime('%Y%m%d-%H%M%S')}-pid{os.getpid()}.trace.json.gz")
        self.steps_left = req.num_steps
        self.prof = profile(activities=activities, record_shapes=req.record_shapes, with_stack=req.with_stack)
        self.prof.start()
        steps = f" for {req.num_steps} steps" if req.num_steps else ""
        logger.info("profiling%s; trace to %s", steps, self.path)
        return ProfileReqOutput(True, f"profiling started{steps}; trace to {self.path}", self.path)

    def stop(self) -> ProfileReqOutput:
        if not self.active:
            return ProfileReqOutput(False, "not profiling")
        prof, path = self.prof, self.path
        self.prof, self.steps_left = None, None
        prof.stop()
        try:
            prof.export_chrome_trace(path)
        except Exception as e:  # a full disk must not take the scheduler down
            logger.exception("could not write the trace")
            return ProfileReqOutput(False, f"profiling stopped, but the trace could not be written: {e}")
        logger.info("profile trace written to %s", path)
        return ProfileReqOutput(True, f"profiling stopped; trace written to {path}", path)

    def step(self) -> None:
        """After a scheduler step that ran a batch: ends a span of `num_steps` steps when it is done."""
        if self.steps_left is None:
            return
        self.steps_left -= 1
        if self.steps_left <= 0:
            self.stop()

    def annotate(self, name: str) -> ContextManager[Any]:
        """A named CPU range in the trace while a span runs; a no-op context otherwise."""
        return torch.profiler.record_function(name) if self.prof is not None else _NULL
