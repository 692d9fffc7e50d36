"""The bulk writer through the public client: a local store in turn (backend ``client``), a tracking
server concurrently (backend ``rest``: REST has no multi-run call). Also the backend of a
``RunTracker`` made on a bare client (:meth:`ClientRunWriter.on`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from l2lab.tracking import connection as cn
from l2lab.tracking import store
from l2lab.tracking.bulk.base import Choice, Epoch, RunWriter, _now_ms


class ClientRunWriter(RunWriter):
    """The public client, one run at a time: in turn for a local store (backend ``client``), the
    runs concurrently for a tracking server (backend ``rest``: REST has no multi-run call)."""

    @classmethod
    def on(cls, client: Any) -> ClientRunWriter:
        """The writer of a bare client (a run's tracker made without a group writer): the same
        calls a run made through the client always made."""
        uri = getattr(client, "tracking_uri", None)
        uri = uri if isinstance(uri, str) else ""
        backend = "rest" if uri.startswith(("http://", "https://")) else "client"
        return cls(uri, client, Choice(backend, "one run's calls through the public client"))

    def create_runs(self, experiment_id: str, names: Sequence[str],
                    tags_list: Sequence[Mapping[str, str]], start_time: int | None = None
                    ) -> list[str]:
        if len(names) != len(tags_list):
            raise ValueError("create_runs: one tags mapping per name")
        start = start_time or _now_ms()

        def create(i: int) -> str:
            try:
                run = self.client.create_run(experiment_id, start_time=start,
                                             tags={k: str(v) for k, v in tags_list[i].items()},
                                             run_name=names[i])
            except Exception as e:  # a login without EDIT there (HTTP 403): one clear paragraph
                if denied := store.permission_denied(e, experiment_id):
                    raise denied from None
                raise
            self._artifact_uris[run.info.run_id] = run.info.artifact_uri
            return run.info.run_id

        return self._timed(lambda: self._each(create, range(len(names))))

    # -- one run's calls: MLflow caps a batch at 100 params/tags or 1000 metrics ------------
    def _batches(self, run_id: str, kind: str, items: list, size: int, **extra: list) -> None:
        """``items`` in chunks of ``size``, the first call carrying ``extra`` (one call when
        there are none)."""
        for i in range(0, max(len(items), 1), size):
            self.client.log_batch(run_id, **{kind: items[i:i + size]}, **extra, synchronous=True)
            extra = {}

    def _run_params(self, run_id: str, params: Mapping[str, Any],
                    tags: Mapping[str, Any] | None) -> None:
        """Params, with a few tags (at most 100 together in the first call)."""
        from mlflow.entities import Param, RunTag

        self._batches(run_id, "params", [Param(k, str(v)) for k, v in params.items()], 100,
                      tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])

    def _run_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._batches(run_id, "tags", [RunTag(k, str(v)) for k, v in tags.items()], 100)

    def _run_epochs(self, run_id: str, epochs: Iterable[Epoch]) -> None:
        """As few calls as MLflow allows (1000 metrics a call), each holding whole epochs: a
        kill between two calls never leaves an epoch half logged (logged epochs are detected by
        ``train/loss``, so the rest would never come)."""
        for chunk in cn.epoch_chunks(list(epochs), cn.MAX_METRICS):
            self.client.log_batch(run_id, metrics=chunk, synchronous=True)

    def _run_finish(self, run_id: str, status: str, failure: str | None,
                    end_time: int | None) -> None:
        """A failure reason goes to the ``l2lab.failure`` tag first."""
        if failure:
            self.client.set_tag(run_id, cn.FAILURE_TAG, failure[:cn.FAILURE_MAX_CHARS])
        self.client.set_terminated(run_id, status=status, end_time=end_time)

    def _run_reopen(self, run_id: str) -> None:
        """RUNNING again, and the old failure reason no longer holds."""
        self.client.update_run(run_id, status="RUNNING")
        if cn.FAILURE_TAG in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, cn.FAILURE_TAG)

    # -- the interface ----------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Mapping[str, Any]],
                   tags: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        tags = tags or {}
        run_ids = list(dict.fromkeys([*params, *tags]))
        if run_ids:
            self._timed(lambda: self._each(
                lambda r: self._run_params(r, params.get(r, {}), tags.get(r)), run_ids))

    def set_tags(self, tags: Mapping[str, Mapping[str, Any]]) -> None:
        run_ids = [r for r, t in tags.items() if t]
        if run_ids:
            self._timed(lambda: self._each(lambda r: self._run_tags(r, tags[r]), run_ids))

    def log_metrics(self, epochs: Mapping[str, Sequence[Epoch]]) -> None:
        """One ``log_batch`` per 1000 metrics per run (whole epochs), the runs concurrently on a
        server."""
        run_ids = [r for r, e in epochs.items() if e and any(m for _, m, _ in e)]
        if run_ids:
            self._timed(lambda: self._each(lambda r: self._run_epochs(r, epochs[r]), run_ids))

    def logged_steps(self, run_ids: Sequence[str], key: str) -> dict[str, set[int]]:
        return dict(zip(run_ids, self._timed(lambda: self._each(
            lambda r: {m.step for m in self.client.get_metric_history(r, key)}, run_ids)),
            strict=True))

    def metric_histories(self, run_ids: Sequence[str], keys: Sequence[str]
                         ) -> dict[str, dict[str, list[Any]]]:
        run_ids, keys = list(dict.fromkeys(run_ids)), list(dict.fromkeys(keys))
        if not run_ids or not keys:
            return {r: {k: [] for k in keys} for r in run_ids}

        def per_run(r: str) -> dict[str, list[Any]]:
            return {k: list(self.client.get_metric_history(r, k)) for k in keys}

        return dict(zip(run_ids, self._timed(lambda: self._each(per_run, run_ids)), strict=True))

    def finish(self, ends: Mapping[str, tuple[str, str | None]], end_time: int | None = None
               ) -> None:
        if ends:
            end = end_time or _now_ms()
            self._timed(lambda: self._each(
                lambda r: self._run_finish(r, ends[r][0], ends[r][1], end), list(ends)))

    def reopen(self, run_ids: Sequence[str]) -> None:
        self._timed(lambda: self._each(self._run_reopen, run_ids))

    def artifact_uris(self, run_ids: Sequence[str]) -> dict[str, str]:
        if missing := [r for r in run_ids if r not in self._artifact_uris]:
            uris = self._timed(lambda: self._each(
                lambda r: self.client.get_run(r).info.artifact_uri, missing))
            self._artifact_uris.update(zip(missing, uris, strict=True))
        return {r: self._artifact_uris[r] for r in run_ids}
