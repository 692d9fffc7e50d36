"""``python -m l2lab.reproduce RUN_ID [--check]``: re-run a logged run from its logged config.

The logged ``config/config.yaml`` is data from a store, possibly someone else's: it is loaded with
``yaml.safe_load`` and refused, before anything is instantiated, when any ``_target_`` (as written
or after resolving interpolations) lies outside the trusted prefixes: the packages a run builds
from (:data:`ALLOWED_TARGETS`) and those the user adds with ``--trust PREFIX`` or
``$L2LAB_TRUSTED_TARGETS``. Never from the logged config itself: a store shared by a team must
not be able to trust itself.

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
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from l2lab.base import CONF_DIR, ConfigError

#: What a logged config may name without the user's word (design.md §6).
ALLOWED_TARGETS = ("l2lab.", "torch.nn.", "torch.optim.", "torchvision.models.",
                   "pytorch_lightning.callbacks.")
#: The environment variable of the user's own trusted prefixes (comma- or os.pathsep-separated).
TRUST_ENV = "L2LAB_TRUSTED_TARGETS"
GPU_RTOL = 1e-4
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def trusted_prefixes(extra: Iterable[str] = (), environ: Mapping[str, str] | None = None
                     ) -> tuple[str, ...]:
    """:data:`ALLOWED_TARGETS`, then the user's ``--trust`` prefixes (``extra``), then those of
    ``$L2LAB_TRUSTED_TARGETS`` in ``environ`` (default ``os.environ``). Empty entries are
    dropped: an empty prefix would trust everything."""
    env = (os.environ if environ is None else environ).get(TRUST_ENV, "")
    from_env = re.split(f"[,{re.escape(os.pathsep)}]", env)
    added = [p.strip() for p in (*extra, *from_env)]
    return tuple(dict.fromkeys([*ALLOWED_TARGETS, *(p for p in added if p)]))


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


def _advice(target: object) -> str:
    """What the user can do about a refused target: the exact prefix to trust, where trusting
    makes sense."""
    if not (isinstance(target, str) and _DOTTED.fullmatch(target)):
        return "A _target_ must be a dotted name of a class or function."
    top, module = target.split(".")[0], target.rpartition(".")[0]
    if top in sys.stdlib_module_names:
        return (f"{top} is Python's standard library, not a network, penalty or optimizer: no "
                "run needs it, so do not trust it; the config may have been tampered with.")
    return (f"If you trust that code, add --trust {module}. or {TRUST_ENV}={module}. "
            "(trust comes from the command line or the environment, never from the logged "
            "config).")


def _refuse_foreign_targets(tree: Any, when: str, trusted: tuple[str, ...]) -> None:
    for key, target in _targets(tree):
        if not (isinstance(target, str) and target.startswith(trusted)):
            raise ConfigError(
                f"refusing to reproduce: {key} = {target!r} ({when}) is outside the trusted "
                f"packages {', '.join(p + '*' for p in trusted)}. A logged config is data; it "
                f"may not name arbitrary code. {_advice(target)}"
            )


def safe_config(text: str, trusted: Iterable[str] | None = None) -> DictConfig:
    """Parse a logged config safely and check its targets as written and once resolved against
    ``trusted`` (default: :func:`trusted_prefixes` of the environment; nothing in ``text``
    adds to it)."""
    trusted = trusted_prefixes() if trusted is None else tuple(trusted)
    tree = yaml.safe_load(text)
    if not isinstance(tree, dict):
        raise ConfigError("the logged config/config.yaml is not a mapping.")
    _refuse_foreign_targets(tree, "as written", trusted)
    cfg = OmegaConf.create(tree)
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:
        from l2lab.tracking.tracker import one_line

        raise ConfigError(f"the logged config does not resolve: {one_line(e)}") from None
    _refuse_foreign_targets(resolved, "after resolving interpolations", trusted)
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
              out: Path | None = None, trusted: Iterable[str] | None = None) -> int:
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
    cfg = safe_config(Path(path).read_text(), trusted)
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
    ap.add_argument("--trust", action="append", default=[], metavar="PREFIX",
                    help="also accept _target_s that start with PREFIX (e.g. mylab.models.; "
                    f"repeatable; also ${TRUST_ENV}, comma-separated). Always trusted: "
                    f"{', '.join(ALLOWED_TARGETS)}; never anything the logged config says")
    args = ap.parse_args(argv)
    from l2lab.tracking import tracker as tr  # MLflow and torch: not needed for --help

    try:
        uri = tr.resolve_uri(args.tracking_uri)
        source = tr.resolve_uri(args.source_uri) if args.source_uri else None
        from l2lab.tracking.runs import resolve_run_id

        run_id = resolve_run_id(args.run_id, source or uri)
        return reproduce(run_id, uri=uri, source_uri=source, check=args.check, out=args.out,
                         trusted=trusted_prefixes(args.trust))
    except ConfigError as e:
        print(f"l2lab-reproduce: error: {e}", file=sys.stderr)
        return 2


def program() -> None:
    """The console script: :func:`main` as the whole process (``lifecycle.run_as_program``)."""
    from l2lab.run.lifecycle import run_as_program

    run_as_program(main)


if __name__ == "__main__":
    program()
