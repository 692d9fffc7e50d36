#!/usr/bin/env python
"""Fetch the torchvision datasets into a data root ahead of time, for nodes without internet.

    scripts/download_data.py [mnist] [fashion_mnist] [cifar10] [cifar100] [--root data]

With no names, all four. The files land where ``data.root`` (default ``data``, relative to the
folder you train from) makes l2lab look for them, so a later run needs no ``data.download=true``:

    python -m l2lab.train data=mnist data.root=/shared/data

Exit status: 0 when every dataset is in place, 1 when a download failed (the message says which
and why; files already in place are kept), 2 on a bad argument.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: l2lab's data names -> torchvision dataset classes (see l2lab.core.data).
DATASETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10",
            "cifar100": "CIFAR100"}


def fetch(name: str, root: Path) -> None:
    """Download (or verify) the train and test splits of one dataset under ``root``."""
    import torchvision

    cls = getattr(torchvision.datasets, DATASETS[name])
    for train in (True, False):
        cls(str(root), train=train, download=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="download_data.py", description=__doc__.splitlines()[0],
        epilog="digits (scikit-learn's bundled copy) and mnist1d (generated) need no download.")
    ap.add_argument("names", nargs="*", metavar="NAME", default=list(DATASETS),
                    help=f"datasets to fetch: {', '.join(DATASETS)} (default: all)")
    ap.add_argument("--root", type=Path, default=Path("data"),
                    help="the data.root to fill (default: ./data)")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in DATASETS]
    if unknown:
        print(f"download_data.py: error: unknown dataset(s) {', '.join(unknown)}; choose from "
              f"{', '.join(DATASETS)}.", file=sys.stderr)
        return 2
    root = args.root.expanduser().resolve()
    failed = []
    for name in args.names:
        print(f"{name}: fetching into {root} ...", flush=True)
        try:
            root.mkdir(parents=True, exist_ok=True)
            fetch(name, root)
        except Exception as e:  # network, disk, checksum: say which and go on with the rest
            reason = " ".join(str(e).split()) or type(e).__name__
            print(f"{name}: download failed: {reason[:500]}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        print(f"{name}: ready (train with data={name} data.root={root})", flush=True)
    if failed:
        print(f"download_data.py: {len(failed)} of {len(args.names)} failed ({', '.join(failed)})"
              "; on a machine without internet, run this where there is access and copy "
              f"{root} over.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
