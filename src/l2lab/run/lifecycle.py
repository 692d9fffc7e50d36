"""A run's life, one way for single runs, stacks and DDP ranks: interrupts become a clean stop.

Ctrl-C and SIGTERM raise :class:`Interrupted` (not ``KeyboardInterrupt``: Lightning turns that
into ``sys.exit(1)`` and leaves SIGINT ignored in the calling process), so the code that owns the
runs ends them KILLED with a reason that names the signal, and the process's own handlers come
back when training returns. A second Ctrl-C while the runs are being ended is held back until
they are. A sweep's process keeps these handlers for the whole multirun (``train.main``), so a stop
between jobs, or while a launcher waits, ends the sweep as cleanly (``run.sweep.stopped``).

No handler raises inside an import (:func:`after_imports`): an exception there leaves a module
half-initialised, so the next import of it fails in strange ways (a ``RecursionError`` in numpy),
and one raised in Python code that C++ called while torch imports aborts the process
(``pybind11::error_already_set``, exit -6). The signal is sent again until it lands outside.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class Interrupted(BaseException):  # noqa: N818  (a stop, as KeyboardInterrupt, not an error)
    """Ctrl-C (SIGINT) or SIGTERM arrived while runs were training."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(SIGNAL_NAMES.get(signum, f"signal {signum}"))

    @property
    def reason(self) -> str:
        return f"interrupted ({self})"

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


#: How soon a signal that landed inside an import is sent again.
RETRY_S = 0.05

Handler = Callable[[int, FrameType | None], None]


def importing(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs inside an import (any caller is in ``importlib._bootstrap``)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def after_imports(handler: Handler) -> Handler:
    """``handler``, run only outside imports: a signal arriving inside one is sent to this process
    again after :data:`RETRY_S`, until it arrives outside (imports take seconds at most)."""

    def handle(signum: int, frame: FrameType | None) -> None:
        if importing(frame):
            threading.Timer(RETRY_S, os.kill, (os.getpid(), signum)).start()
            return
        handler(signum, frame)

    return handle


@after_imports
def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def nothing_recorded(signum: int) -> str:
    """The one line of a process stopped before it created any run."""
    return (f"l2lab: {Interrupted(signum).reason} during start-up, before any run was created: "
            "nothing was recorded.")


@after_imports
def _exit_at_startup(signum: int, frame: FrameType | None) -> None:
    print(f"\n{nothing_recorded(signum)}", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def guard_startup() -> None:
    """From a command's first import on, Ctrl-C prints :func:`nothing_recorded` and exits 130.
    It raises ``SystemExit``, which Python ends without a traceback (a ``KeyboardInterrupt``
    printed 80-110 lines of import frames), never inside an import (:func:`after_imports`); the
    command's ``main`` replaces it by :func:`interrupts`."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _exit_at_startup)


@contextlib.contextmanager
def interrupts() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted`; the previous handlers are
    restored on the way out. Outside the main thread (signals go to the main thread only) it does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in SIGNAL_NAMES}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Signals wait while the block runs (the runs are being marked KILLED or FAILED)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda n, _f: caught.append(n)) for s in SIGNAL_NAMES}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if caught:
        raise Interrupted(caught[0])


def resume_command(run_id: str) -> str:
    """A resume command that works when pasted into any shell: the interpreter that ran this
    one, by its full path, so no virtualenv needs to be active."""
    return f"{sys.executable} -m l2lab.train resume={run_id}"


def run_as_program(main: Callable[[], int | None]) -> None:
    """Run a command's ``main`` as the whole process and end it without the interpreter's
    teardown (:func:`exit_without_teardown`): the ``l2lab-*`` console scripts and ``python -m
    l2lab.<command>``. In-process callers (tests, notebooks) call ``main`` itself. An exception
    other than ``SystemExit`` ends the process as Python does (its traceback, a full teardown)."""
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # as sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    exit_without_teardown(code)


def exit_without_teardown(code: int) -> None:
    """Exit with ``code`` after the ``atexit`` handlers (logging's flush and close, MLflow's,
    multiprocessing's, ``weakref.finalize``), skipping the interpreter's teardown of its modules:
    with torch, Lightning and MLflow loaded that teardown alone took 2.8 s after a single run's
    last line on the 2-core CPU (``docs/performance.md``). Everything the command writes is
    closed or committed by then (a SQLite transaction not committed is rolled back either way).
    While another non-daemon thread runs, Python's own exit (which waits for it) is used."""
    import atexit

    if any(t.is_alive() and not t.daemon and t is not threading.main_thread()
           for t in threading.enumerate()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
