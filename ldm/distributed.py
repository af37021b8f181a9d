"""Process coordination without barriers that can hang: one process decides, every process hears the answer.

Used by the steps that touch a shared folder from many processes (the latent cache, DreamBooth's class
images), and by the image check that each process makes of its share of the data. ``dist`` is an
``Accelerator`` or ``PartialState`` (``process_index``, ``num_processes``, ``is_main_process``,
``wait_for_everyone``), or ``SingleProcess()`` for one process.
"""

from __future__ import annotations

import os
import pickle
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (``taskset``, a container's cpuset), which
    ``os.cpu_count()`` ignores; at least 1."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # platforms without affinity masks
        return os.cpu_count() or 1


class SingleProcess:
    """The ``dist`` of a one-process build (an ``Accelerator`` or ``PartialState`` has the same four names)."""

    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def main_decides(dist, decide: Callable[[], str]) -> str:
    """``decide()`` on the main process, its answer (or its error) on every process of ``dist``.

    One process reads the shared state (a cache folder, say), not every process of every machine, and all
    of them act on the same answer (a shared filesystem may look different between machines for a moment).
    Without an initialised process group (a one-process ``dist``) every process decides alone.
    """
    if _alone(dist):
        return decide()
    answer: list = [None]
    if dist.is_main_process:
        try:
            answer = [("ok", decide())]
        except Exception as err:  # raised on every process, so none waits at a barrier for ever
            answer = [("error", _portable(err))]
    torch.distributed.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise value
    return value


def everyone_does(dist, work: Callable[[], None]) -> None:
    """``work()`` on every process of ``dist``, then wait for all of them; an error on any process is raised
    on every process (the failing one raises its own), so none waits at a barrier for ever."""
    gather_from_everyone(dist, work)


def gather_from_everyone(dist, work: Callable[[], T]) -> list[T]:
    """``work()`` on every process of ``dist``; every process gets the list of all their results (process
    order). An error on any process is raised on every process (the failing one raises its own)."""
    result, error = None, None
    try:
        result = work()
    except Exception as err:  # noqa: BLE001 - exchanged, then raised
        error = err
    if _alone(dist):
        if error is not None:
            raise error
        return [result]
    gathered: list = [None] * dist.num_processes
    mine = ("error", _portable(error)) if error is not None else ("ok", result)
    torch.distributed.all_gather_object(gathered, mine)
    if error is not None:
        raise error
    failed = next((value for kind, value in gathered if kind == "error"), None)
    if failed is not None:
        raise failed
    return [value for _, value in gathered]


def _alone(dist) -> bool:
    return dist.num_processes == 1 or not torch.distributed.is_initialized()


def _portable(error: Exception) -> Exception:
    """``error`` if it survives pickling (to travel to the other processes), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(error).__name__}: {error}")
