"""A process group made of threads, with an event log, and a stand-in DeepSpeed engine, for the
checkpoint tests (no tests here).

``ThreadGroup(world).run(fn)`` runs ``fn()`` once per rank, each in its own thread; the
collectives msgfm.train.checkpoint uses (barrier, all_gather_object, broadcast_object_list)
really synchronise the threads, and every rank's k-th collective is logged on entry and exit.
:meth:`ThreadGroup.happens_before` then answers, from the log alone and whatever the thread
timing was, whether one event was guaranteed to come before another: the same rank in program
order, or the first rank entered a collective before the event and the second left that same
collective before its own.
"""
from __future__ import annotations

import errno
import os
import pickle
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class Event:
    rank: int
    index: int  # position in that rank's own sequence
    kind: str
    detail: Any = None


class ThreadGroup:
    def __init__(self, world: int, timeout_s: float = 30.0) -> None:
        self.world = world
        self.timeout_s = timeout_s
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self._barrier = threading.Barrier(world, timeout=timeout_s)
        self._slots: list[Any] = [None] * world
        self._count = [0] * world

    # -- the part of deepspeed.comm msgfm uses ---------------------------------------------

    def get_rank(self) -> int:
        return self._local.rank

    def get_world_size(self) -> int:
        return self.world

    def barrier(self) -> None:
        self._collective("barrier", None)

    def all_gather_object(self, out: list[Any], obj: Any) -> None:
        out[:] = self._collective("all_gather_object", obj)

    def broadcast_object_list(self, objects: list[Any], src: int = 0) -> None:
        gathered = self._collective("broadcast_object_list", list(objects))
        objects[:] = gathered[src]

    # -- the log -------------------------------------------------------------------------------

    def log(self, kind: str, detail: Any = None) -> None:
        rank = getattr(self._local, "rank", None)
        if rank is None:
            return
        with self._lock:
            index = sum(e.rank == rank for e in self.events)
            self.events.append(Event(rank, index, kind, detail))

    def _collective(self, name: str, obj: Any) -> list[Any]:
        rank = self.get_rank()
        k = self._count[rank]
        self._count[rank] += 1
        self.log("enter", (k, name))
        self._slots[rank] = pickle.dumps(obj)  # what a real group sends: a copy
        self._barrier.wait()
        gathered = [pickle.loads(blob) for blob in self._slots]
        self._barrier.wait()  # nobody overwrites a slot before everyone has read them
        self.log("exit", (k, name))
        return gathered

    def run(self, fn: Callable[[], Any]) -> list[Any]:
        """``fn()`` on every rank; returns each rank's result or the exception it raised."""
        results: list[Any] = [None] * self.world

        def body(rank: int) -> None:
            self._local.rank = rank
            try:
                results[rank] = fn()
                self.log("returned")
            except BaseException as err:  # noqa: BLE001 (the test inspects it)
                results[rank] = err
                self.log("raised", err)

        threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(self.world)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + self.timeout_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, t in enumerate(threads) if t.is_alive()]
        if hung:
            self._barrier.abort()  # frees the ranks left waiting for one that stopped
        assert not hung, f"rank(s) {hung} hung in a collective: {results}"
        return results

    # -- questions about the log ---------------------------------------------------------------

    def find(self, kind: str, match: Callable[[Any], bool] = lambda d: True, rank: int | None = None) -> list[Event]:
        return [e for e in self.events if e.kind == kind and match(e.detail) and (rank is None or e.rank == rank)]

    def happens_before(self, a: Event, b: Event) -> bool:
        if a.rank == b.rank:
            return a.index < b.index
        for enter in self.find("enter", rank=a.rank):
            if enter.index <= a.index:
                continue
            k = enter.detail[0]
            if any(x.detail[0] == k and x.index < b.index for x in self.find("exit", rank=b.rank)):
                return True
        return False


class FakeWriter:
    """DeepSpeed's checkpoint writer: ``save(state_dict, path)``."""

    def __init__(self, group: ThreadGroup, full_disk: str | None) -> None:
        self.group = group
        self.full_disk = full_disk if group.get_rank() == 1 else None

    def save(self, state_dict: dict, path: str) -> None:
        if self.group.get_rank() > 0:
            time.sleep(0.2)  # rank 1 writes late: a rank 0 that does not wait for it publishes too early
        if self.full_disk is not None:  # this rank's disk is full: real ENOSPC from /dev/full
            os.symlink("/dev/full", path)
            torch.save(state_dict, path, _use_new_zipfile_serialization=self.full_disk == "zip")
        else:
            torch.save(state_dict, path)
        self.group.log("write", Path(path).name)


class FakeEngine:
    """Writes like ``DeepSpeedEngine.save_checkpoint``: barrier, each rank's files, rank 0's script copy, barrier."""

    def __init__(self, group: ThreadGroup, full_disk: str | None = None, script_fails: bool = False) -> None:
        self.group = group
        self.checkpoint_engine = FakeWriter(group, full_disk)
        self.script_fails = script_fails

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> bool:
        rank = self.group.get_rank()
        folder = Path(save_dir) / tag
        self.group.barrier()
        folder.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            self.checkpoint_engine.save({"module": {"w": torch.arange(8.0)}, **client_state},
                                        str(folder / "mp_rank_00_model_states.pt"))
        self.checkpoint_engine.save({"state": torch.full((64,), float(rank))},
                                    str(folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
        if rank == 0:  # DeepSpeed copies its recovery script with shutil, not through the writer
            if self.script_fails:
                raise OSError(errno.ENOSPC, "No space left on device", str(folder / "zero_to_fp32.py"))
            shutil.copyfile(__file__, folder / "zero_to_fp32.py")
        self.group.barrier()
        return True
