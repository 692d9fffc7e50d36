"""One run's MLflow record, and its config as params: a :class:`RunTracker` is a view of one run
on the run writer, :mod:`l2lab.tracking.bulk`, which writes one run or a stack's K together.
(Connecting to a store: :mod:`l2lab.tracking.connection`, re-exported here; reading runs back:
:mod:`l2lab.tracking.runs`.)
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from l2lab.tracking.connection import (  # noqa: F401  (re-exported: the store's names)
    EXPERIMENT_KIND,
    FAILURE_MAX_CHARS,
    FAILURE_TAG,
    MAX_METRICS,
    MLFLOW_SECONDS,
    SQLITE_BUSY_TIMEOUT_MS,
    artifact_location,
    connect,
    epoch_chunks,
    experiment_id,
    one_line,
    reader,
    sqlite_path,
)

# The URI and login checks need neither torch nor MLflow: they live in l2lab.tracking.store (a
# single run's unreachable server or refused login is reported before the heavy imports),
# re-exported here.
from l2lab.tracking.store import ENV_URI, PROBE_TIMEOUT_S, probe_server, resolve_uri  # noqa: F401

_VALID_KEY = re.compile(r"^[/\w.\- :]*$")


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def flatten_params(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """A resolved config as Hydra override keys (``optimizer.lr``): lists as JSON, and a dict
    whose keys MLflow rejects (``lam_per_layer`` with ``*``), or an empty one, as one JSON value."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            if v and all(_VALID_KEY.match(str(kk)) for kk in v):
                out.update(flatten_params(v, key + "."))
            else:
                out[key] = json.dumps(v, sort_keys=True)
        else:
            out[key] = _value(v)
    return out


@functools.lru_cache(maxsize=8)
def git_commit(cwd: Path | None = None) -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                           timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def as_writer(writer: Any) -> Any:
    """The run writer (``bulk.RunWriter``) to write through: ``writer`` itself, or for a bare
    client the public-client backend on it (``bulk.ClientRunWriter.on``)."""
    from l2lab.tracking.bulk.base import RunWriter

    if isinstance(writer, RunWriter):
        return writer
    from l2lab.tracking import connection

    if isinstance(bare := getattr(writer, "_client", writer), connection._SqliteFirst):
        if bare.writer is None:  # a SQLite store l2lab writes itself: without MLflow
            from l2lab.tracking.bulk import open_writer

            bare.writer = open_writer(bare.tracking_uri, bare)
        return bare.writer
    from l2lab.tracking.bulk.client import ClientRunWriter

    return ClientRunWriter.on(writer)


class RunTracker:
    """One MLflow run: a view of one run id on the run writer, ``bulk.RunWriter``, the one
    interface that writes params, tags, metrics, artifacts and a run's end, for one run or a
    stack's K together. Made on a group's writer (the engine: its runs' calls then take that
    writer's path, SQL included), or on a bare client (the public client, call by call). Runs
    are named by explicit ids (no global 'active run': jobs may share a process)."""

    def __init__(self, writer: Any, run_id: str) -> None:
        self.writer, self.run_id = as_writer(writer), run_id
        self.ended = self.reopened = False

    @classmethod
    def start(cls, writer: Any, exp_id: str, run_name: str, tags: Mapping[str, str],
              start_time: int | None = None) -> RunTracker:
        """A new RUNNING run (a login without EDIT there is one clear paragraph)."""
        writer = as_writer(writer)
        (run_id,) = writer.create_runs(exp_id, [run_name], [dict(tags)], start_time)
        return cls(writer, run_id)

    @classmethod
    def reopen(cls, writer: Any, run_id: str) -> RunTracker:
        """Continue a run (resume): RUNNING again, and the old failure reason no longer holds."""
        tracker = cls(writer, run_id)
        tracker.writer.reopen([run_id])
        tracker.reopened = True  # its logged epochs are not logged again
        return tracker

    def log_params(self, params: Mapping[str, str], tags: Mapping[str, str] | None = None
                   ) -> None:
        """Params (and a few tags) in few store calls."""
        self.writer.log_params({self.run_id: params}, {self.run_id: tags} if tags else None)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.writer.set_tags({self.run_id: tags})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.log_epochs([(step, metrics, int(time.time() * 1000))])

    def log_epochs(self, epochs: Iterable[tuple[int, Mapping[str, float], int]]) -> None:
        """Several steps' metrics, in calls that hold whole epochs (see the writer)."""
        self.writer.log_metrics({self.run_id: list(epochs)})

    def logged_steps(self, key: str) -> set[int]:
        return self.writer.logged_steps([self.run_id], key)[self.run_id]

    def log_text(self, text: str, artifact_file: str) -> None:
        self.writer.log_text(self.run_id, text, artifact_file)

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        self.writer.log_file(self.run_id, path, artifact_path)

    def log_state_dict(self, module: torch.nn.Module, artifact_file: str) -> None:
        import torch

        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(artifact_file).name
            torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, p)
            self.log_file(p, str(Path(artifact_file).parent))

    def finish(self, status: str = "FINISHED", failure: str | None = None,
               end_time: int | None = None) -> None:
        """End the run once; a failure reason goes to the ``l2lab.failure`` tag first."""
        if self.ended:
            return
        self.writer.finish({self.run_id: (status, failure)}, end_time)
        self.ended = True


def parse_overrides(overrides: Iterable[str]) -> dict[str, str]:
    """``["regularization.lam=0.1", "+x=1"]`` -> ``{"regularization.lam": "0.1", "x": "1"}``."""
    out = {}
    for o in overrides:
        key, _, value = o.partition("=")
        out[key.lstrip("+~")] = value
    return out


class NullTracker:
    """Records nothing: DDP ranks 1..N-1 (only rank 0 writes) and the benchmark's no-MLflow
    side."""

    run_id = None
    ended = False

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def logged_steps(self, key: str) -> set[int]:
        return set()

    def finish(self, status: str = "FINISHED", failure: str | None = None) -> None:
        pass

    def __getattr__(self, name: str):  # any other recording call: nothing either
        return lambda *args, **kwargs: None
