"""Preemption: what a run does when the cluster sends SIGTERM (Slurm before a job's time limit or
a preemption, Kubernetes before evicting a pod), then SIGKILL after a grace period.

The signal only raises a flag; the training loop looks at it at every step boundary (all ranks
agree on it with one tiny all-reduce on their own gloo group, so they stop at the same step),
writes a checkpoint at the current step through the normal commit protocol and leaves ``run``
with :class:`Preempted`; ``pml-train`` then exits :data:`EXIT_PREEMPTED`. Rerunning the same
command resumes from that step.

The grace clock is started by a watcher thread fed by ``signal.set_wakeup_fd``, i.e. by the C
signal handler itself: it runs even while the main thread is stuck in a collective whose peer is
gone (where a Python-level handler would never get to run). If the checkpoint is not committed
within ``run.preempt_grace_s`` the process exits :data:`EXIT_GRACE_EXCEEDED` at once, leaving the
previous checkpoint as the one to resume from (a commit cut short never becomes ``latest``).
"""

from __future__ import annotations

import os
import select
import signal
import threading

EXIT_PREEMPTED = 143  # 128 + SIGTERM: checkpoint committed at the current step; rerun to resume
EXIT_GRACE_EXCEEDED = 124  # SIGTERM, but no checkpoint within run.preempt_grace_s: resume from the previous one


class Preempted(Exception):
    """Raised out of ``train.run`` once the preemption checkpoint ``tag`` is committed."""

    def __init__(self, tag: str):
        super().__init__(f"preempted (SIGTERM): checkpoint {tag} committed; rerun the same command to resume")
        self.tag = tag


class PreemptionGuard:
    """SIGTERM -> a flag the loop polls (``should_stop``) and a hard deadline ``grace_s`` later.

    Installed only from the main thread (signal handlers live there); elsewhere it is inert and
    SIGTERM keeps its previous meaning."""

    def __init__(self, grace_s: float, *, group=None, world_size: int = 1):
        self.grace_s = float(grace_s)
        self.group, self.world_size = group, int(world_size)
        self.requested = False  # this process got SIGTERM
        self.stopping = False  # some rank got it: every rank checkpoints and stops
        self.done = threading.Event()  # set once the preemption checkpoint is committed (or on uninstall)
        self._installed = False
        self._old_handler = None
        self._old_wakeup = -1
        self._pipe = None
        self._watcher = None

    # ------------------------------------------------------------------ signal plumbing
    def install(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            return self
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._pipe = (r, w)
        self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._watcher = threading.Thread(target=self._watch, name="pml-preempt-watch", daemon=True)
        self._watcher.start()
        self._installed = True
        return self

    def _on_sigterm(self, signum, frame) -> None:
        """Python-level handler (main thread, between bytecodes): just the flag."""
        self.requested = True

    def _watch(self) -> None:
        """Wakes on the C handler's byte: SIGTERM starts the grace clock; the pipe closing ends us."""
        r = self._pipe[0]
        while True:
            select.select([r], [], [])
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data:
                return
            if signal.SIGTERM in data:
                self.requested = True
                _say(f"[pml-scale] SIGTERM: checkpointing at the next step boundary "
                     f"(grace {self.grace_s:g} s)")
                if self.grace_s > 0 and not self.done.wait(self.grace_s):
                    _say(f"[pml-scale] SIGTERM: no checkpoint within run.preempt_grace_s={self.grace_s:g} s; "
                         f"exiting {EXIT_GRACE_EXCEEDED}: the rerun resumes from the previous checkpoint")
                    os._exit(EXIT_GRACE_EXCEEDED)
                return

    def uninstall(self) -> None:
        """Restore the previous SIGTERM handling (a library caller may run several runs)."""
        if not self._installed:
            return
        self._installed = False
        self.done.set()
        signal.set_wakeup_fd(self._old_wakeup)
        signal.signal(signal.SIGTERM, self._old_handler)
        r, w = self._pipe
        os.close(w)  # EOF ends the watcher
        self._watcher.join(timeout=1.0)
        os.close(r)

    # ------------------------------------------------------------------ the loop's side
    def should_stop(self) -> bool:
        """Whether the run must checkpoint and stop after this step; the same answer on every rank
        (one all-reduce of a flag on the guard's own gloo group when there are several)."""
        if self.stopping:
            return True
        flag = self.requested
        if self.world_size > 1 and self.group is not None:
            import torch
            import torch.distributed as dist

            t = torch.tensor([1 if flag else 0], dtype=torch.int32)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            flag = bool(t.item())
        self.stopping = flag
        return flag

    def committed(self, tag: str) -> Preempted:
        """The checkpoint ``tag`` is in: stop the grace clock; returns the exception to raise."""
        self.done.set()
        return Preempted(tag)


def _say(message: str) -> None:
    """stderr from any thread, without Python's buffered streams (the main thread may hold them)."""
    try:
        os.write(2, (message + "\n").encode())
    except OSError:
        pass
