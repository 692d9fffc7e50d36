#!/usr/bin/env python
"""Check, in a fraction of a second, that ``requirements.lock`` matches ``pyproject.toml``: every
dependency of the project and of each extra is pinned in the lock to a version inside the
project's range, and the lock pins no direct dependency that the project no longer has. (That
the lock still *resolves* is what ``make test``'s install from it proves.) Exit 1 naming each
mismatch, with the command that refreshes the lock (``make lock``)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: the copy pip carries
    from pip._vendor import tomli as tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def pins(lock: str) -> tuple[dict[str, Version], set[str]]:
    """(name -> pinned version, names the lock says the project asks for directly)."""
    pinned, direct, current = {}, set(), None
    for line in lock.splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line):
            current = canonicalize_name(m.group(1))
            pinned[current] = Version(m.group(2))
        elif current and re.match(r"^\s+#\s+(via\s+)?l2lab\b", line):  # its "via" lines
            direct.add(current)
        elif not line.startswith(" "):
            current = None
    return pinned, direct


def problems(pyproject: dict, lock: str) -> list[str]:
    project = pyproject["project"]
    extras = project.get("optional-dependencies", {})
    reqs = [Requirement(r) for r in project.get("dependencies", [])]
    reqs += [Requirement(r) for group in extras.values() for r in group]
    pinned, direct = pins(lock)
    out, wanted = [], set()
    for req in reqs:
        name = canonicalize_name(req.name)
        if name == "l2lab":  # `all` = l2lab[...]: the other extras
            continue
        wanted.add(name)
        if name not in pinned:
            out.append(f"{req.name}: in pyproject.toml, not in the lock")
        elif req.specifier and not req.specifier.contains(pinned[name], prereleases=True):
            out.append(f"{req.name}: the lock pins {pinned[name]}, outside {req.specifier}")
    out += [f"{n}: pinned as a dependency of l2lab, which no longer asks for it"
            for n in sorted(direct - wanted)]
    return out


def main() -> int:
    found = problems(tomllib.loads((ROOT / "pyproject.toml").read_text()),
                     (ROOT / "requirements.lock").read_text())
    if found:
        print("requirements.lock does not match pyproject.toml:\n  " + "\n  ".join(found) +
              "\nRefresh it with `make lock` (pip-compile) and commit it.", file=sys.stderr)
        return 1
    print("requirements.lock matches pyproject.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
