"""``torchrun --nproc-per-node N -m ringfuse serve --tp N``: one server over N ranks.

Rank 0 runs the HTTP server and the engine loop (engine_loop.py); ranks 1..N-1 load the same
model, each its own slices, and follow rank 0 step by step without a server. Every rank runs
the same scheduler (runtime/engine.py): given the same requests in the same order, all admit,
preempt and sample alike (the logits are gathered on every rank, the seeds are rank 0's). So
rank 0 only has to tell the others, once per loop iteration, which commands it carried out
(adds, aborts) and whether it steps: one gloo broadcast of a 2 x int64 header [flags, payload
bytes], plus the pickled commands when there are any. That is ~0.1 ms against a decode step
of ~10 ms, and the model's own collectives run on ringfuse's shared-memory ring as in
``ringfuse generate --tp``.

Faults end in a clear error within the timeout (``--tp-timeout``, default 60 s):
- idle, rank 0 sends a heartbeat every ``heartbeat_s`` so that the followers' wait, bounded by
  the process group's timeout, does not run out;
- a follower whose rank 0 died (its socket closes) or went silent exits 1 with a message;
- a follower that dies makes rank 0's next collective fail (the ring notices a dead peer at
  once, gloo a closed socket): its requests get a clean error and the server exits 1, after
  which torchrun stops the other ranks.

SIGINT / SIGTERM (from a terminal or from torchrun, which relays its own): rank 0 shuts down
gracefully and then sends STOP; a follower keeps following until that STOP, so that the
requests in flight can finish, then exits 0.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
from typing import Callable

import torch
import torch.distributed as dist

from .engine_loop import apply_commands

STEP, STOP = 1, 2  # header flags
MAX_HEARTBEAT_S = 5.0


def heartbeat_for(timeout_s: float) -> float:
    """Seconds between an idle rank 0's heartbeats: well inside the followers' timeout."""
    return min(MAX_HEARTBEAT_S, timeout_s / 4)


class Leader:
    """Rank 0's side (an engine_loop.Mirror). Called on the engine thread only, as every
    collective of rank 0 is."""

    def __init__(self, timeout_s: float, group=None):
        self.heartbeat_s = heartbeat_for(timeout_s)
        self.group = group
        self._header = torch.zeros(2, dtype=torch.int64)  # [flags, payload bytes]

    def send(self, commands: list[tuple], step: bool) -> None:
        self._broadcast(STEP if step else 0, commands)

    def heartbeat(self) -> None:
        self._broadcast(0, [])

    def stop(self) -> None:
        self._broadcast(STOP, [])

    def _broadcast(self, flags: int, commands: list[tuple]) -> None:
        payload = pickle.dumps(commands, protocol=pickle.HIGHEST_PROTOCOL) if commands else b""
        self._header[0], self._header[1] = flags, len(payload)
        dist.broadcast(self._header, src=0, group=self.group)
        if payload:
            dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), src=0, group=self.group)


def receiver(group=None) -> Callable[[], tuple[int, list[tuple]]]:
    """A follower's receive(): the next (flags, commands) Leader broadcast. It raises what the
    process group raises when rank 0 dies or stays silent past the timeout."""
    header = torch.zeros(2, dtype=torch.int64)

    def receive() -> tuple[int, list[tuple]]:
        dist.broadcast(header, src=0, group=group)
        flags, size = header.tolist()
        if not size:
            return flags, []
        payload = torch.empty(size, dtype=torch.uint8)
        dist.broadcast(payload, src=0, group=group)
        return flags, pickle.loads(payload.numpy().tobytes())  # from rank 0 of this job: trusted

    return receive


def follow(llm, receive: Callable[[], tuple[int, list[tuple]]]) -> None:
    """A follower's loop: carry out what rank 0 did, step when it steps, until STOP."""
    while True:
        flags, commands = receive()
        apply_commands(llm, commands)  # the same refusals as rank 0's, which tells their clients
        if flags & STOP:
            llm.abort_all()
            return
        if flags & STEP:
            llm.step()


def init(timeout_s: float) -> tuple[int, int]:
    """Join torchrun's process group with ``timeout_s`` for gloo and ringfuse's ring."""
    from .. import distributed

    _stop_with_torchrun()
    rank, world = distributed.init(timeout_s=timeout_s)
    distributed.set_timeout(timeout_s)
    return rank, world


def _stop_with_torchrun() -> None:
    """Have the kernel SIGTERM this rank when torchrun, its parent, dies outright (Linux's
    PR_SET_PDEATHSIG), as torchrun itself would on its way out: no rank is left serving or
    following alone."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    if os.getppid() == 1:  # torchrun died before the prctl: nobody will send it
        os.kill(os.getpid(), signal.SIGTERM)


def run_follower(make_llm) -> int:
    """Ranks 1..N-1 of ``ringfuse serve --tp N``: the exit status."""
    from .. import distributed
    from .server import say_line

    rank, world = dist.get_rank(), dist.get_world_size()

    def say(message: str) -> None:
        say_line(f"ringfuse serve (rank {rank}/{world}): {message}")

    signalled = []
    for sig in (signal.SIGINT, signal.SIGTERM):  # wait for rank 0's STOP: it finishes what is in flight
        signal.signal(sig, lambda signum, frame: signalled.append(signum))
    try:
        try:
            llm = make_llm()  # its collectives fail too if rank 0 gave up (a busy port, a bad model)
        except Exception as e:
            say(f"error: start-up failed: {type(e).__name__}: {_first_line(e)}")
            return 1
        say(f"model loaded (pid {os.getpid()}); following rank 0")
        try:
            follow(llm, receiver())
        except Exception as e:  # rank 0 died, went silent or failed: say so in one line
            say(f"error: stopped following rank 0: {type(e).__name__}: {_first_line(e)}")
            return 1
    finally:
        distributed.destroy()
    say("stopped" + (" (signalled)" if signalled else ""))
    return 0


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "(no message)"
