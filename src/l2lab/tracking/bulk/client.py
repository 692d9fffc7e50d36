"""The bulk writer through the public client: a local store in turn (mode ``client``), a tracking
server concurrently (mode ``rest``: REST has no multi-run call)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from l2lab.tracking import tracker as tr
from l2lab.tracking.bulk.base import BulkStore, Epoch, _now_ms


class ClientBulkStore(BulkStore):
    """The public client, one run at a time: in turn for a local store (mode ``client``), the
    runs concurrently for a tracking server (mode ``rest``: REST has no multi-run call)."""

    def _tracker(self, run_id: str) -> tr.RunTracker:
        return tr.RunTracker(self.client, run_id)

    def create_runs(self, experiment_id: str, names: Sequence[str],
                    tags_list: Sequence[Mapping[str, str]], start_time: int | None = None
                    ) -> list[str]:
        if len(names) != len(tags_list):
            raise ValueError("create_runs: one tags mapping per name")
        start = start_time or _now_ms()

        def create(i: int) -> str:
            run = self.client.create_run(experiment_id, start_time=start,
                                         tags={k: str(v) for k, v in tags_list[i].items()},
                                         run_name=names[i])
            self._artifact_uris[run.info.run_id] = run.info.artifact_uri
            return run.info.run_id

        return self._timed(lambda: self._each(create, range(len(names))))

    def log_params(self, params: Mapping[str, Mapping[str, Any]],
                   tags: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        tags = tags or {}
        run_ids = list(dict.fromkeys([*params, *tags]))
        if run_ids:
            self._timed(lambda: self._each(
                lambda r: self._tracker(r).log_params(params.get(r, {}), tags.get(r)), run_ids))

    def set_tags(self, tags: Mapping[str, Mapping[str, Any]]) -> None:
        run_ids = [r for r, t in tags.items() if t]
        if run_ids:
            self._timed(lambda: self._each(lambda r: self._tracker(r).set_tags(tags[r]), run_ids))

    def log_metrics(self, epochs: Mapping[str, Sequence[Epoch]]) -> None:
        """One ``log_batch`` per 1000 metrics per run (whole epochs), the runs concurrently on a
        server."""
        run_ids = [r for r, e in epochs.items() if e and any(m for _, m, _ in e)]
        if run_ids:
            self._timed(lambda: self._each(lambda r: self._tracker(r).log_epochs(epochs[r]),
                                           run_ids))

    def logged_steps(self, run_ids: Sequence[str], key: str) -> dict[str, set[int]]:
        return dict(zip(run_ids, self._timed(lambda: self._each(
            lambda r: self._tracker(r).logged_steps(key), run_ids)), strict=True))

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
                lambda r: self._tracker(r).finish(ends[r][0], failure=ends[r][1], end_time=end),
                list(ends)))

    def reopen(self, run_ids: Sequence[str]) -> None:
        self._timed(lambda: self._each(lambda r: tr.RunTracker.reopen(self.client, r), run_ids))

    def artifact_uris(self, run_ids: Sequence[str]) -> dict[str, str]:
        if missing := [r for r in run_ids if r not in self._artifact_uris]:
            uris = self._timed(lambda: self._each(
                lambda r: self.client.get_run(r).info.artifact_uri, missing))
            self._artifact_uris.update(zip(missing, uris, strict=True))
        return {r: self._artifact_uris[r] for r in run_ids}
