"""The bulk writer's interface (:class:`RunWriter`), what both backends share (artifacts written
in place for a local store, the counted client), and the types the backends and the factory use."""

from __future__ import annotations

import contextlib
import math
import os
import posixpath
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from l2lab.tracking import connection as cn

# (step, {key: value}, timestamp in ms): one epoch of one run
Epoch = tuple[int, Mapping[str, float], int]
REST_WORKERS = 8


def _now_ms() -> int:
    return int(time.time() * 1000)


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def local_artifact_dir(artifact_uri: str | None) -> Path | None:
    """The folder of a ``file://`` (or plain path) artifact URI; ``None`` for remote stores."""
    if not artifact_uri:
        return None
    scheme = urlparse(artifact_uri).scheme
    if scheme == "file":  # as mlflow.utils.file_utils.local_file_uri_to_path on POSIX
        return Path(url2pathname(urlparse(artifact_uri).path))
    if scheme == "" and os.path.isabs(artifact_uri):
        return Path(artifact_uri)
    return None


def _relative(artifact_path: str | None) -> str:
    """A run-relative POSIX path that cannot leave the run's artifact folder."""
    p = posixpath.normpath(artifact_path or ".")
    if p.startswith(("/", "../")) or p == "..":
        raise ValueError(f"artifact path must stay inside the run: {artifact_path!r}")
    return "" if p == "." else p


# -- what both SQL backends share: the metric rows MLflow stores ------------------------------
def metric_rows(run_ids: Sequence[str], epochs: Mapping[str, Sequence[Epoch]],
                check: Callable[..., None]) -> tuple[list[dict[str, Any]],
                                                     dict[tuple[str, str], dict[str, Any]]]:
    """The ``metrics`` rows of a flush, as ``SqlAlchemyStore.log_batch`` stores them (checked by
    ``check(key, value, timestamp, step, path)``, NaN and ±inf sanitised, exact duplicates
    dropped), and per (run, key) the newest of them: the ``latest_metrics`` candidate."""
    rows, seen = [], set()
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for r in run_ids:
        n = 0
        for step, kv, ts in epochs[r]:
            for k, v in kv.items():
                value, step_, ts_ = float(v), int(step), int(ts)
                check(k, value, ts_, step_, path=f"metrics[{n}]")
                n += 1
                is_nan = math.isnan(value)  # as SqlAlchemyStore.sanitize_metric_value
                if is_nan:
                    value = 0.0
                elif math.isinf(value):
                    value = 1.7976931348623157e308 if value > 0 else -1.7976931348623157e308
                row = dict(run_uuid=r, key=k, value=value, timestamp=ts_, step=step_,
                           is_nan=is_nan)
                ident = (r, k, ts_, step_, value, is_nan)
                if ident in seen:  # MLflow drops exact duplicates within a batch
                    continue
                seen.add(ident)
                rows.append(row)
                if (r, k) not in latest or newer(row, latest[(r, k)]):
                    latest[(r, k)] = row
    return rows, latest


def newer(a: Mapping[str, Any], b: Any) -> bool:
    """MLflow's order for ``latest_metrics``: larger step, then timestamp, then value."""
    get = (lambda m, k: m[k]) if isinstance(b, Mapping) else getattr
    return (a["step"], a["timestamp"], a["value"]) > (get(b, "step"), get(b, "timestamp"),
                                                      get(b, "value"))


@dataclass(frozen=True)
class Choice:
    """Which backend a store gets, and why (printed by ``bench``, asserted by the tests)."""

    backend: str  # "sqlite", "sql", "rest" or "client"
    why: str
    store: Any = None  # MLflow's SqlAlchemyStore, for "sql"


class RunWriter:
    """Writes the runs of one stack (or any set of runs in one store) together: the one
    run-writing interface (``tracker.RunTracker`` is a view of one run on it).

    Every method takes all runs at once and returns when the store has them. ``round_trips``
    counts store round trips (SQL transactions or client calls) made by this writer; ``backend``
    says which one it is: ``"sql"``, ``"rest"`` or ``"client"`` (the fallback). Made by
    :func:`open_writer`; artifacts are written here, the same for both backends.
    """

    def __init__(self, uri: str, client: Any | None, choice: Choice) -> None:
        self.uri = uri
        client = client if client is not None else cn.connect(uri)
        # the bare client, counted: this writer times its calls itself (cn.MLFLOW_SECONDS), once
        # for a whole group, whose calls may overlap in threads
        self.client = _Counting(getattr(client, "_client", client), self)
        self.round_trips = 0
        self._artifact_uris: dict[str, str] = {}
        self.backend, self.why = choice.backend, choice.why

    def _timed(self, fn: Callable[[], Any]) -> Any:
        """Adds the time to ``tracking.MLFLOW_SECONDS``, as the client's own calls do."""
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            cn.MLFLOW_SECONDS[0] += time.perf_counter() - t0

    def _each(self, fn: Callable[[Any], Any], run_ids: Sequence[Any]) -> list:
        """``fn`` per run through the client: concurrently for a server, in turn otherwise."""
        if self.backend == "rest" and len(run_ids) > 1:
            with ThreadPoolExecutor(min(REST_WORKERS, len(run_ids))) as pool:
                return list(pool.map(fn, run_ids))
        return [fn(r) for r in run_ids]

    # -- the interface: one store round trip per call on SQL --------------------------------
    def create_runs(self, experiment_id: str, names: Sequence[str],
                    tags_list: Sequence[Mapping[str, str]], start_time: int | None = None
                    ) -> list[str]:
        """Creates one RUNNING run per name (tags as given, ``mlflow.runName`` = name);
        returns their ids in order."""
        raise NotImplementedError

    def log_params(self, params: Mapping[str, Mapping[str, Any]],
                   tags: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Params (and tags) of every run. As MLflow: a param logged again with the same value
        is a no-op, with another value an error."""
        raise NotImplementedError

    def set_tags(self, tags: Mapping[str, Mapping[str, Any]]) -> None:
        """Sets (or overwrites) tags of every run."""
        raise NotImplementedError

    def log_metrics(self, epochs: Mapping[str, Sequence[Epoch]]) -> None:
        """Every run's pending epochs; ``latest_metrics`` follows as MLflow keeps it."""
        raise NotImplementedError

    def logged_steps(self, run_ids: Sequence[str], key: str) -> dict[str, set[int]]:
        """The steps of ``key`` the store holds per run: what a resumed stack must not log
        again."""
        raise NotImplementedError

    def metric_histories(self, run_ids: Sequence[str], keys: Sequence[str]
                         ) -> dict[str, dict[str, list[Any]]]:
        """``{run_id: {key: [Metric, ...]}}``: for every run and key exactly what
        ``MlflowClient.get_metric_history(run_id, key)`` returns (every stored row, in its order,
        NaN as NaN; ``[]`` for none)."""
        raise NotImplementedError

    def finish(self, ends: Mapping[str, tuple[str, str | None]], end_time: int | None = None
               ) -> None:
        """Ends every run with its status; a failure reason (cut to ``FAILURE_MAX_CHARS``) goes
        to tag ``l2lab.failure`` first."""
        raise NotImplementedError

    def reopen(self, run_ids: Sequence[str]) -> None:
        """Runs continued by ``resume``: RUNNING again, and an old failure reason (tag
        ``l2lab.failure``) no longer holds."""
        raise NotImplementedError

    def artifact_uris(self, run_ids: Sequence[str]) -> dict[str, str]:
        """Each run's artifact URI: known for runs this writer created, else asked for."""
        raise NotImplementedError

    # -- artifacts: the same for both backends ----------------------------------------------
    def local_path(self, run_id: str, artifact_file: str) -> Path | None:
        """Where ``artifact_file`` of the run lives when its artifact store is a local folder
        (parents created), so that a caller can write it there directly; ``None`` otherwise."""
        root = local_artifact_dir(self.artifact_uris([run_id])[run_id])
        if root is None:
            return None
        path = root / _relative(artifact_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """``artifact_file`` (run-relative) holding ``text`` (UTF-8), as ``MlflowClient.log_text``:
        a local store gets the file written in place, others one client call."""
        dest = self.local_path(run_id, artifact_file)
        if dest is None:
            self._timed(lambda: self.client.log_text(run_id, text, artifact_file))
            return
        _write_atomic(dest, lambda f: f.write(text.encode("utf-8")))

    def log_file(self, run_id: str, local_path: str | Path, artifact_dir: str | None = None
                 ) -> None:
        """A local file into the run's ``artifact_dir`` (its name kept), as
        ``MlflowClient.log_artifact``: copied in place for a local store, else one call."""
        name = Path(local_path).name
        dest = self.local_path(run_id, posixpath.join(_relative(artifact_dir), name))
        if dest is None:
            self._timed(lambda: self.client.log_artifact(run_id, str(local_path), artifact_dir))
            return
        with open(local_path, "rb") as src:
            _write_atomic(dest, lambda f: shutil.copyfileobj(src, f))

    def log_texts(self, texts: Mapping[str, Mapping[str, str]]) -> None:
        """``{run_id: {artifact_file: text}}``: ``log_text`` for many runs (for a server, the
        runs concurrently)."""
        self.artifact_uris(list(texts))
        self._each(lambda r: [self.log_text(r, t, f) for f, t in texts[r].items()], list(texts))

    def log_files(self, files: Mapping[str, Sequence[tuple[str | Path, str | None]]]) -> None:
        """``{run_id: [(local_path, artifact_dir), ...]}``: ``log_file`` for many runs (for a
        server, the runs concurrently)."""
        self.artifact_uris(list(files))
        self._each(lambda r: [self.log_file(r, f, d) for f, d in files[r]], list(files))



class OneTransactionWriter(RunWriter):
    """What both SQL backends share: every call one transaction for all its runs. The calls'
    argument handling is here; each backend's ``_create``, ``_params_tags``, ``_metrics``,
    ``_finish``, ``_reopen`` and ``_check_runs`` run the transaction on its own database API."""

    def create_runs(self, experiment_id: str, names: Sequence[str],
                    tags_list: Sequence[Mapping[str, str]], start_time: int | None = None
                    ) -> list[str]:
        """Creates one RUNNING run per name (tags as given, ``mlflow.runName`` = name) in one
        transaction; returns their ids in order."""
        if len(names) != len(tags_list):
            raise ValueError("create_runs: one tags mapping per name")
        start = start_time or _now_ms()
        return self._timed(lambda: self._create(experiment_id, names, tags_list, start))

    def log_params(self, params: Mapping[str, Mapping[str, Any]],
                   tags: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Params (and tags) of every run: one transaction. As MLflow: a param logged again
        with the same value is a no-op, with another value an error."""
        tags = tags or {}
        run_ids = list(dict.fromkeys([*params, *tags]))
        if run_ids:
            self._timed(lambda: self._params_tags(run_ids, params, tags))

    def set_tags(self, tags: Mapping[str, Mapping[str, Any]]) -> None:
        """Sets (or overwrites) tags of every run: one transaction."""
        run_ids = [r for r, t in tags.items() if t]
        if run_ids:
            self._timed(lambda: self._params_tags(run_ids, {}, tags))

    def log_metrics(self, epochs: Mapping[str, Sequence[Epoch]]) -> None:
        """Every run's pending epochs in one transaction; ``latest_metrics`` follows as MLflow
        keeps it (a row already stored, from a re-sent flush, is skipped as MLflow skips it)."""
        run_ids = [r for r, e in epochs.items() if e and any(m for _, m, _ in e)]
        if run_ids:
            self._timed(lambda: self._metrics(run_ids, epochs))

    def finish(self, ends: Mapping[str, tuple[str, str | None]], end_time: int | None = None
               ) -> None:
        """Ends every run with its status; a failure reason goes to tag ``l2lab.failure`` first,
        as the client backend does. One transaction."""
        if not ends:
            return
        from l2lab.compat import mlflow_sqlite as cs

        statuses = {r: cs.run_status(st) for r, (st, _) in ends.items()}
        reasons = {r: {cn.FAILURE_TAG: why[:cn.FAILURE_MAX_CHARS]}
                   for r, (_, why) in ends.items() if why}
        end = end_time or _now_ms()
        self._timed(lambda: self._finish(statuses, reasons, end))

    def reopen(self, run_ids: Sequence[str]) -> None:
        """Runs continued by ``resume``: RUNNING again, and an old failure reason no longer
        holds (as the client backend). One transaction."""
        self._timed(lambda: self._reopen(run_ids))

    def artifact_uris(self, run_ids: Sequence[str]) -> dict[str, str]:
        """Each run's artifact URI: known for runs this writer created, else one query for
        all."""
        missing = [r for r in run_ids if r not in self._artifact_uris]
        if missing:
            self._timed(lambda: self._check_runs(missing))
        return {r: self._artifact_uris[r] for r in run_ids}

    def _create(self, experiment_id: str, names: Sequence[str],
                tags_list: Sequence[Mapping[str, str]], start: int) -> list[str]:
        raise NotImplementedError

    def _params_tags(self, run_ids: Sequence[str], params: Mapping[str, Mapping[str, Any]],
                     tags: Mapping[str, Mapping[str, Any]]) -> None:
        raise NotImplementedError

    def _metrics(self, run_ids: Sequence[str], epochs: Mapping[str, Sequence[Epoch]]) -> None:
        raise NotImplementedError

    def _check_runs(self, run_ids: Sequence[str]) -> None:
        """The runs exist and are active; their artifact URIs are known after it."""
        raise NotImplementedError

    def _finish(self, statuses: Mapping[str, str], reasons: Mapping[str, Mapping[str, str]],
                end: int) -> None:
        """Each run's status and end time, the failure tags first."""
        raise NotImplementedError

    def _reopen(self, run_ids: Sequence[str]) -> None:
        raise NotImplementedError


class _Counting:
    """A client whose every call adds one to its writer's ``round_trips`` (thread-safe)."""

    def __init__(self, client: Any, writer: RunWriter) -> None:
        self._client, self._writer, self._lock = client, writer, threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self._writer.round_trips += 1
            return attr(*args, **kwargs)

        return counted


def _write_atomic(dest: Path, write: Callable[[Any], Any]) -> None:
    """Readers (the UI, a download) never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
