"""An in-memory tracking store for unit tests of the engine: no MLflow store, no SQLite.

:class:`FakeWriter` answers today's bulk writer interface (``l2lab.tracking.bulk.base.RunWriter``,
every public method with the same parameters: ``test_engine_unit`` holds it to that), and
:class:`FakeClient` the few ``MlflowClient`` calls that ``RunTracker`` and ``experiment_id`` make.
Both write into one :class:`FakeStore`, so a test reads every run as the engine left it. When the
writer interface changes, this file is the one to adapt.

A call the fakes do not implement raises ``AttributeError``: a test notices that the engine took
a path nobody faked, instead of that call silently doing nothing.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mlflow.entities import Metric

from l2lab.tracking.bulk.base import RunWriter
from l2lab.tracking.tracker import FAILURE_MAX_CHARS, FAILURE_TAG


@dataclass
class FakeRun:
    run_id: str
    experiment_id: str
    tags: dict[str, str]
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, list[Metric]] = field(default_factory=dict)
    status: str = "RUNNING"
    ends: list[str] = field(default_factory=list)  # every status it was ended with, in order

    @property
    def name(self) -> str:
        return self.tags["mlflow.runName"]

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of ``key`` in the order logged."""
        return [(m.step, m.value) for m in self.metrics.get(key, [])]

    def final(self, key: str) -> float:
        """The value at the last step, as MLflow's ``latest_metrics`` keeps it."""
        return max(self.metrics[key], key=lambda m: (m.step, m.timestamp)).value


class FakeStore:
    """Runs and experiments in memory; ``root`` holds the runs' artifact folders (local files,
    as a SQLite store's)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.runs: dict[str, FakeRun] = {}
        self.experiments: dict[str, str] = {}  # name -> id
        self.calls: list[str] = []  # every writer and client call, by name, in order
        self._ids = itertools.count(1)
        self.writer = FakeWriter(self)
        self.client = FakeClient(self)

    def new_id(self) -> str:
        return f"{next(self._ids):032x}"

    def run(self, run_id: str) -> FakeRun:
        return self.runs[run_id]

    def by_name(self) -> dict[str, FakeRun]:
        return {r.name: r for r in self.runs.values()}

    def artifact_dir(self, run_id: str) -> Path:
        return self.root / run_id / "artifacts"

    # -- shared by the writer and the client ----------------------------------------------------
    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self.runs[run_id].tags.update({k: str(v) for k, v in tags.items()})

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        run = self.runs[run_id]
        for k, v in params.items():
            if k in run.params and run.params[k] != str(v):  # as MLflow: params are immutable
                raise ValueError(f"param {k} of run {run_id} changed: {run.params[k]} -> {v}")
            run.params[k] = str(v)

    def log_metric(self, run_id: str, key: str, value: float, timestamp: int, step: int) -> None:
        self.runs[run_id].metrics.setdefault(key, []).append(
            Metric(key, float(value), int(timestamp), int(step)))

    def end(self, run_id: str, status: str, failure: str | None = None) -> None:
        run = self.runs[run_id]
        if failure:
            run.tags[FAILURE_TAG] = failure[:FAILURE_MAX_CHARS]
        run.status = status
        run.ends.append(status)


class FakeWriter(RunWriter):
    """``RunWriter``'s interface over a :class:`FakeStore`: each call takes every run at once.
    A subclass (its ``__init__`` not called: no client, no store) so that ``RunTracker``
    writes through it as through any writer."""

    backend, why = "fake", "in-memory store for unit tests"

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.uri = f"fake://{store.root}"
        self.round_trips = 0

    def _call(self, name: str) -> None:
        self.store.calls.append(f"writer.{name}")
        self.round_trips += 1

    def create_runs(self, experiment_id: str, names: Sequence[str],
                    tags_list: Sequence[Mapping[str, str]], start_time: int | None = None
                    ) -> list[str]:
        self._call("create_runs")
        ids = []
        for name, tags in zip(names, tags_list, strict=True):
            rid = self.store.new_id()
            self.store.runs[rid] = FakeRun(rid, experiment_id,
                                           {**{k: str(v) for k, v in tags.items()},
                                            "mlflow.runName": name})
            ids.append(rid)
        return ids

    def log_params(self, params: Mapping[str, Mapping[str, Any]],
                   tags: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self._call("log_params")
        for rid, p in params.items():
            self.store.log_params(rid, p)
        for rid, t in (tags or {}).items():
            self.store.set_tags(rid, t)

    def set_tags(self, tags: Mapping[str, Mapping[str, Any]]) -> None:
        self._call("set_tags")
        for rid, t in tags.items():
            self.store.set_tags(rid, t)

    def log_metrics(self, epochs: Mapping[str, Sequence[tuple[int, Mapping[str, float], int]]]
                    ) -> None:
        self._call("log_metrics")
        for rid, rows in epochs.items():
            for step, metrics, ts in rows:
                for key, value in metrics.items():
                    self.store.log_metric(rid, key, value, ts, step)

    def logged_steps(self, run_ids: Sequence[str], key: str) -> dict[str, set[int]]:
        self._call("logged_steps")
        return {r: {m.step for m in self.store.runs[r].metrics.get(key, [])} for r in run_ids}

    def metric_histories(self, run_ids: Sequence[str], keys: Sequence[str]
                         ) -> dict[str, dict[str, list[Any]]]:
        self._call("metric_histories")
        return {r: {k: list(self.store.runs[r].metrics.get(k, [])) for k in keys}
                for r in run_ids}

    def finish(self, ends: Mapping[str, tuple[str, str | None]], end_time: int | None = None
               ) -> None:
        self._call("finish")
        for rid, (status, why) in ends.items():
            self.store.end(rid, status, why)

    def reopen(self, run_ids: Sequence[str]) -> None:
        self._call("reopen")
        for rid in run_ids:
            run = self.store.runs[rid]
            run.status = "RUNNING"
            run.tags.pop(FAILURE_TAG, None)

    def artifact_uris(self, run_ids: Sequence[str]) -> dict[str, str]:
        return {r: self.store.artifact_dir(r).as_uri() for r in run_ids}

    def local_path(self, run_id: str, artifact_file: str) -> Path | None:
        path = self.store.artifact_dir(run_id) / artifact_file
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.local_path(run_id, artifact_file).write_text(text, encoding="utf-8")

    def log_file(self, run_id: str, local_path: str | Path, artifact_dir: str | None = None
                 ) -> None:
        name = Path(local_path).name
        shutil.copy(local_path, self.local_path(
            run_id, f"{artifact_dir}/{name}" if artifact_dir else name))

    def log_texts(self, texts: Mapping[str, Mapping[str, str]]) -> None:
        self._call("log_texts")
        for rid, files in texts.items():
            for path, text in files.items():
                self.log_text(rid, text, path)

    def log_files(self, files: Mapping[str, Sequence[tuple[str | Path, str | None]]]) -> None:
        self._call("log_files")
        for rid, pairs in files.items():
            for path, artifact_dir in pairs:
                self.log_file(rid, path, artifact_dir)


class FakeClient:
    """The ``MlflowClient`` calls of ``RunTracker`` (a run that ends on its own: a diverged
    network, a sweep's parent) and of ``tracking.tracker.experiment_id``."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store

    def _call(self, name: str) -> None:
        self.store.calls.append(f"client.{name}")

    def get_experiment_by_name(self, name: str) -> SimpleNamespace | None:
        self._call("get_experiment_by_name")
        eid = self.store.experiments.get(name)
        return None if eid is None else SimpleNamespace(
            experiment_id=eid, name=name, lifecycle_stage="active")

    def create_experiment(self, name: str, artifact_location: str | None = None,
                          tags: Mapping[str, str] | None = None) -> str:
        self._call("create_experiment")
        self.store.experiments[name] = str(len(self.store.experiments) + 1)
        return self.store.experiments[name]

    def set_tag(self, run_id: str, key: str, value: Any, synchronous: bool | None = None
                ) -> None:
        self._call("set_tag")
        self.store.set_tags(run_id, {key: value})

    def set_terminated(self, run_id: str, status: str | None = None,
                       end_time: int | None = None) -> None:
        self._call("set_terminated")
        self.store.end(run_id, status or "FINISHED")

    def get_metric_history(self, run_id: str, key: str) -> list[Metric]:
        self._call("get_metric_history")
        return list(self.store.runs[run_id].metrics.get(key, []))

    def log_batch(self, run_id: str, metrics: Sequence[Metric] = (), params: Sequence = (),
                  tags: Sequence = (), synchronous: bool | None = None) -> None:
        self._call("log_batch")
        for m in metrics:
            self.store.log_metric(run_id, m.key, m.value, m.timestamp, m.step)
        self.store.log_params(run_id, {p.key: p.value for p in params})
        self.store.set_tags(run_id, {t.key: t.value for t in tags})


def install(monkeypatch, root: Path) -> FakeStore:
    """Route the engine's store through a new :class:`FakeStore`: ``tracker.connect`` returns
    its client and ``engine.writer_for`` its writer, for any URI."""
    from l2lab.run import engine
    from l2lab.tracking import tracker as tr

    store = FakeStore(root)
    monkeypatch.setattr(tr, "connect", lambda uri: store.client)
    monkeypatch.setattr(engine, "writer_for", lambda uri, client: store.writer)
    return store
