"""``python -m l2lab.reproduce RUN_ID [--check]``: re-run a logged run from its logged config.

The logged ``config/config.yaml`` is data from a store, possibly someone else's: it is loaded with
``yaml.safe_load`` and refused, before anything is instantiated, when any ``_target_`` (as written
or after resolving interpolations) lies outside the packages a run legitimately builds from.

``--check`` compares every final metric: exactly on CPU (a CPU run is a pure function of ``seed``
and ``data.split_seed``), within a relative ``GPU_RTOL`` on GPU, where cuDNN/cuBLAS kernels may
sum in a different order even with ``trainer.deterministic=true``. A job of a vectorized sweep
(tag ``l2lab.vectorized_group``) is re-run as an ordinary run, a stack of one: on CPU that is the
very computation it had in its stack, so it too is compared exactly; on GPU the batched kernels
may round differently for another stack size, which ``GPU_RTOL`` covers.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from l2lab.base import CONF_DIR, ConfigError

ALLOWED_TARGETS = ("l2lab.", "torch.nn.", "torch.optim.", "pytorch_lightning.callbacks.")
GPU_RTOL = 1e-4


def _targets(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{path}.{k}" if path else str(k)
            if k == "_target_":
                yield key, v
            else:
                yield from _targets(v, key)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{path}[{i}]")


def _refuse_foreign_targets(tree: Any, when: str) -> None:
    for key, target in _targets(tree):
        if not (isinstance(target, str) and target.startswith(ALLOWED_TARGETS)):
            raise ConfigError(
                f"refusing to reproduce: {key} = {target!r} ({when}) is outside the allowed "
                f"packages {', '.join(p + '*' for p in ALLOWED_TARGETS)}. A logged config is "
                "data; it may not name arbitrary code."
            )


def safe_config(text: str) -> DictConfig:
    """Parse a logged config safely and check its targets as written and once resolved."""
    tree = yaml.safe_load(text)
    if not isinstance(tree, dict):
        raise ConfigError("the logged config/config.yaml is not a mapping.")
    _refuse_foreign_targets(tree, "as written")
    cfg = OmegaConf.create(tree)
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:
        from l2lab.tracking.tracker import one_line

        raise ConfigError(f"the logged config does not resolve: {one_line(e)}") from None
    _refuse_foreign_targets(resolved, "after resolving interpolations")
    return OmegaConf.create(resolved)


def compare_metrics(old: dict[str, float], new: dict[str, float], rtol: float) -> list[tuple]:
    """Rows (metric, original, reproduced, equal) over the original run's final metrics."""
    rows = []
    for k in sorted(old):
        a, b = old[k], new.get(k, math.nan)
        same = a == b or (rtol > 0 and math.isclose(a, b, rel_tol=rtol, abs_tol=rtol * 1e-3))
        rows.append((k, a, b, same))
    return rows


def reproduce(run_id: str, *, uri: str, source_uri: str | None = None, check: bool = False,
              out: Path | None = None) -> int:
    from l2lab.console import quiet_libraries
    from l2lab.tracking import tracker as tr

    quiet_libraries()
    src = tr.connect(source_uri or uri)
    try:
        run = src.get_run(run_id)
    except Exception:
        raise ConfigError(f"no run {run_id!r} in {source_uri or uri}.") from None
    try:
        path = src.download_artifacts(run_id, "config/config.yaml")
    except Exception:
        raise ConfigError(f"run {run_id} has no config/config.yaml artifact.") from None
    cfg = safe_config(Path(path).read_text())
    cfg.resume = None
    cfg.tracking.uri = uri
    overrides = yaml.safe_load(Path(src.download_artifacts(
        run_id, "config/overrides.yaml")).read_text()) or []
    old_commit, now_commit = run.data.tags.get("mlflow.source.git.commit"), tr.git_commit(
        CONF_DIR.parent)
    if old_commit and now_commit and old_commit != now_commit:
        print(f"l2lab-reproduce: warning: the run was made at commit {old_commit[:10]}, this "
              f"checkout is at {now_commit[:10]}; results may differ (git checkout "
              f"{old_commit[:10]} to reproduce exactly).", file=sys.stderr)
    env_diffs = environment_differences(run.data.tags, cfg, old_commit, now_commit)

    from l2lab.train import train

    out = out or Path("outputs") / f"reproduce-{run_id[:8]}-{datetime.now():%Y%m%d-%H%M%S-%f}"
    train(cfg, overrides=overrides, output_dir=out, tags={"l2lab.reproduced_from": run_id})
    dst = tr.connect(uri)
    (new,) = dst.search_runs(
        [e.experiment_id for e in dst.search_experiments()],
        filter_string=f"tags.`l2lab.reproduced_from` = '{run_id}'",
        order_by=["attributes.start_time DESC"], max_results=1)
    on_gpu = str(cfg.trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda") and \
        _cuda_available()
    vectorized = "l2lab.vectorized_group" in run.data.tags
    rtol = GPU_RTOL if on_gpu else 0.0
    rows = compare_metrics(run.data.metrics, new.data.metrics, rtol)
    width = max(len(r[0]) for r in rows) if rows else 6
    how = ("GPU" if on_gpu else "CPU") + (", vectorized original" if vectorized else "")
    print(f"\nreproduced {run_id} as {new.info.run_id} "
          f"({f'{how}, rtol={rtol:g}' if rtol else f'{how}, exact'})\n")
    print(f"{'metric':<{width}}  {'original':>14}  {'reproduced':>14}  same")
    for k, a, b, same in rows:
        print(f"{k:<{width}}  {a:>14.8g}  {b:>14.8g}  {'yes' if same else 'NO'}")
    differ = [r[0] for r in rows if not r[3]]
    if differ:
        print(f"\n{len(differ)} metric(s) differ: {', '.join(differ)}")
    if env_diffs is not None:
        from l2lab.tracking.environment import verdict

        print(f"\n{verdict(env_diffs, bool(differ))}")
    return 1 if (check and differ) else 0


def environment_differences(tags: dict[str, str], cfg: DictConfig, old_commit: str | None,
                            now_commit: str | None) -> list[tuple[str, str, str]] | None:
    """Print what differs between the environment the run logged and today's, before anything
    is compared; None for a run that logged none (made before it was recorded)."""
    from l2lab.tracking import environment

    if not any(k.startswith(environment.PREFIX) for k in tags):
        print("environment: the run recorded none (made before l2lab recorded it)")
        return None
    diffs = environment.differences(tags, environment.tags(cfg.trainer))
    if old_commit and now_commit and old_commit != now_commit:
        diffs.insert(0, ("git_commit", old_commit[:10], now_commit[:10]))
    if not diffs:
        print("environment: the same as the run's (versions, device, threads, flags, code)")
        return diffs
    width = max(len(k) for k, _, _ in diffs)
    print("environment: differs from the run's")
    for key, then, now in diffs:
        print(f"  {key:<{width}}  logged {then}  |  now {now}")
    return diffs


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="l2lab-reproduce", description=__doc__.splitlines()[0])
    ap.add_argument("run_id", help="the run to re-run: its id, or a unique prefix of 6 or more "
                    "characters")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 when a final metric differs: exact on CPU (a job of a "
                    "vectorized sweep too: one engine, the same computation as a stack of one); "
                    f"rtol {GPU_RTOL:g} on GPU. What differs in the environment (versions, "
                    "device, threads, flags, code) is printed first")
    ap.add_argument("--tracking-uri", help="store for the new run (default: $MLFLOW_TRACKING_URI "
                    "or ./mlruns/mlflow.db; never the URI logged in the old config)")
    ap.add_argument("--source-uri", help="store holding RUN_ID (default: --tracking-uri)")
    ap.add_argument("--out", type=Path, help="output folder of the new run")
    args = ap.parse_args(argv)
    from l2lab.tracking import tracker as tr  # MLflow and torch: not needed for --help

    try:
        uri = tr.resolve_uri(args.tracking_uri)
        source = tr.resolve_uri(args.source_uri) if args.source_uri else None
        from l2lab.tracking.runs import resolve_run_id

        run_id = resolve_run_id(args.run_id, source or uri)
        return reproduce(run_id, uri=uri, source_uri=source, check=args.check, out=args.out)
    except ConfigError as e:
        print(f"l2lab-reproduce: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
