"""Kernel compilation off the caller's path: the first call of a layer never waits for numba.

numba compiles a kernel the first time it meets its argument types (about 30 s for the batch-norm
kernels of one dtype on a 2-core CPU with an empty cache; 0.5 s to load them from its disk cache
afterwards). Each group of kernels that compiles together is a *job*, named by a key such as
``("numba_bn", torch.float32)``, with a function that compiles them without running them. Two
modes (:func:`set_mode`, or the environment variable ``NORMBENCH_KERNEL_COMPILE``):

- ``background`` (default): the first :func:`ready` of a key starts its job in a daemon thread and
  answers False; ``impl="auto"`` then runs ``analytic`` (the same numbers up to rounding) until a
  later call finds the job done. The thread competes for the GIL with the caller only while it
  compiles.
- ``wait``: the job runs on the caller's thread the first time (what numba does by itself); the
  tests use it, so that ``impl="auto"`` takes the kernels from its first call.

``impl="fused"``, asked for by name, always waits (:func:`ready` with ``wait=True``): it must run
the kernels. Listeners (:func:`add_listener`) hear when a job starts and ends: ``normbench
profile`` says from them that it is compiling, and keeps that time out of its numbers.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Callable, Hashable, Iterator

MODES = ("background", "wait")
_ENV = "NORMBENCH_KERNEL_COMPILE"

_mode: str | None = None
_lock = threading.Lock()
_jobs: dict[Hashable, "_Job"] = {}
_listeners: list[Callable[[str, Hashable, float | None], None]] = []


class _Job:
    """One compilation: its thread (None when it ran inline), when it finished, and its error."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.seconds: float | None = None
        self.thread: threading.Thread | None = None


def mode() -> str:
    """The compile mode: :func:`set_mode`'s, else ``$NORMBENCH_KERNEL_COMPILE``, else ``background``."""
    if _mode is not None:
        return _mode
    env = os.environ.get(_ENV, "background")
    return env if env in MODES else "background"


def set_mode(name: str | None) -> None:
    """``background`` or ``wait`` (see the module docstring); None goes back to the environment's."""
    global _mode
    if name is not None and name not in MODES:
        raise ValueError(f"compile mode must be one of {', '.join(MODES)}, got {name!r}")
    _mode = name


@contextlib.contextmanager
def compile_mode(name: str) -> Iterator[None]:
    """:func:`set_mode` for the ``with`` block, then back to the mode before it. Training runs
    that must give the same numbers every time use ``wait``: in ``background`` mode the steps
    taken before the kernels are ready run ``analytic``, whose rounding differs."""
    global _mode
    before = _mode
    set_mode(name)
    try:
        yield
    finally:
        _mode = before


def add_listener(fn: Callable[[str, Hashable, float | None], None]) -> None:
    """Call ``fn(event, key, seconds)`` when a job starts (``"start"``, None) and when it ends
    (``"done"`` or ``"failed"``, with its duration), from the thread that compiles."""
    _listeners.append(fn)


def remove_listener(fn: Callable[[str, Hashable, float | None], None]) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def _notify(event: str, key: Hashable, seconds: float | None) -> None:
    for fn in list(_listeners):
        try:
            fn(event, key, seconds)
        except Exception:  # noqa: BLE001 - a listener must not break compilation
            pass


def _run(job: _Job, key: Hashable, compile_fn: Callable[[], None]) -> None:
    _notify("start", key, None)
    t0 = time.perf_counter()
    try:
        compile_fn()
    except BaseException as exc:  # noqa: BLE001 - kept and raised to whoever waits
        job.error = exc
    job.seconds = time.perf_counter() - t0
    job.done.set()
    _notify("failed" if job.error is not None else "done", key, job.seconds)


def ready(key: Hashable, compile_fn: Callable[[], None], wait: bool = False) -> bool:
    """Whether the kernels of ``key`` are compiled, starting ``compile_fn`` the first time.

    ``wait=False`` in ``background`` mode answers at once (False while compiling, and for good if
    compilation failed: the caller stays on its fallback); otherwise this returns once compiled,
    and raises compilation's error if it failed."""
    job = _jobs.get(key)  # the common case, compiled long ago, without the lock (a dict read is atomic)
    if job is not None and job.done.is_set() and job.error is None:
        return True
    inline = wait or mode() == "wait"
    with _lock:
        job = _jobs.get(key)
        start = job is None
        if start:
            job = _jobs[key] = _Job()
            if not inline:
                job.thread = threading.Thread(target=_run, args=(job, key, compile_fn),
                                              name=f"normbench-compile-{key}", daemon=True)
                job.thread.start()
    if start and inline:
        _run(job, key, compile_fn)
    if inline and not job.done.is_set():
        job.done.wait()
    if job.done.is_set():
        if job.error is not None:
            if inline:
                raise job.error
            return False
        return True
    return False


def wait(key: Hashable, timeout: float | None = None) -> bool:
    """Block until the job of ``key`` (if started) ends, at most ``timeout`` seconds: whether it
    ended and compiled. False for a key never started."""
    job = _jobs.get(key)
    if job is None:
        return False
    return job.done.wait(timeout) and job.error is None


def status() -> dict[Hashable, str]:
    """Every job started in this process: ``"compiling"``, ``"ready"`` or ``"failed"``."""
    return {key: ("compiling" if not job.done.is_set() else "failed" if job.error else "ready")
            for key, job in list(_jobs.items())}


def compiling() -> list[Hashable]:
    """The keys whose jobs are still running."""
    return [key for key, state in status().items() if state == "compiling"]


def forget(key: Hashable) -> None:
    """Drop the record of a finished job, so that the next :func:`ready` starts it again (numba
    keeps what it compiled in memory: the job then only checks it). For tests."""
    with _lock:
        job = _jobs.get(key)
        if job is not None and job.done.is_set():
            del _jobs[key]
