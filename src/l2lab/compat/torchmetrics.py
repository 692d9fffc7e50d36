"""torchmetrics' private names that l2lab uses: import it without its optional backends.

Checked against torchmetrics 1.9.0 (with pytorch-lightning 2.6.6 and lightning-utilities 0.15.3;
torchmetrics is not l2lab's dependency but Lightning's, so ``pyproject.toml`` does not bound it).

Why: Lightning imports torchmetrics at its own import (``lightning_fabric.utilities.imports``
compares torchmetrics' version, which imports the package), and torchmetrics imports every
optional backend it finds installed at module level: torchvision's models and ops (which pull in
``torch._dynamo``), ``scipy.signal`` and matplotlib, about 4 s of a command's start-up on the
2-core CPU (``docs/performance.md``). l2lab uses no torchmetrics metric. Telling torchmetrics
that those backends are missing skips them; l2lab's own torchvision imports (``model=resnet18``,
``data=cifar10``) are untouched.

If torchmetrics' layout differs (a flag renamed, the module moved), its flags are left as it sets
them (all or none), so it imports its backends as usual, only slower, and ``tests/test_compat.py``
says so; the one step that still applies is the package's own ``package_available("scipy")``
answering False, which in 1.9 guards only an import of ``scipy.signal`` for a back-compat alias.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing is not imported by ``import l2lab`` otherwise: this stays free
if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import ModuleType
    from typing import Any

CHECKED_WITH = "torchmetrics 1.9.0"

#: ``torchmetrics.utilities.imports`` flags whose backends torchmetrics imports at module level
#: (``functional.image``/``detection``: torchvision; ``functional.audio``: ``scipy.signal``, by
#: the misspelt flag; ``utilities.plot``: matplotlib). Set to False, all or none.
OPTIONAL_BACKENDS = ("_TORCHVISION_AVAILABLE", "_SCIPY_AVAILABLE", "_SCIPI_AVAILABLE",
                     "_MATPLOTLIB_AVAILABLE")
#: The package whose own ``__init__`` imports ``scipy.signal`` when
#: ``lightning_utilities.core.imports.package_available("scipy")``, and the module of the flags.
PACKAGE, FLAGS_MODULE = "torchmetrics", "torchmetrics.utilities.imports"
#: torchmetrics is made lean only when one of these is importing it (Lightning's own import), so
#: that a researcher's ``import torchmetrics`` in the same process gets the whole package.
LIGHTNING = ("lightning_fabric", "pytorch_lightning", "lightning")


def lean_torchmetrics() -> bool:
    """Install a one-shot import hook that makes Lightning's import of torchmetrics skip the
    optional backends. Costs nothing and changes nothing when torchmetrics is imported already
    (or the hook is installed); it removes itself once torchmetrics has been imported. Call it
    before the first ``import pytorch_lightning`` (``l2lab/__init__.py`` does). Returns whether
    it installed the hook."""
    if PACKAGE in sys.modules or any(isinstance(f, _Finder) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _Finder())
    return True


class _Finder:
    """Finds ``torchmetrics`` and its flags module as the other finders do, with the loader
    wrapped (:class:`_Loader`); every other name is left to them."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> Any:
        if fullname not in (PACKAGE, FLAGS_MODULE):
            return None
        if fullname == PACKAGE and not any(name in sys.modules for name in LIGHTNING):
            _remove(self)  # imported by someone else than Lightning: the whole package
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, self)
                return spec
        return None


class _Loader:
    """The real loader, with one step around executing each of the two modules."""

    def __init__(self, loader: Any, finder: _Finder) -> None:
        self._loader, self._finder = loader, finder

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        if module.__name__ == FLAGS_MODULE:
            self._loader.exec_module(module)
            if all(hasattr(module, flag) for flag in OPTIONAL_BACKENDS):
                for flag in OPTIONAL_BACKENDS:
                    setattr(module, flag, False)
            return
        try:  # the package: its own scipy.signal import asks package_available("scipy")
            with _scipy_hidden():
                self._loader.exec_module(module)
        finally:
            _remove(self._finder)


class _scipy_hidden:
    """``lightning_utilities.core.imports.package_available`` answers False for scipy while the
    torchmetrics package executes (it binds the name then: restored in its namespace too)."""

    def __enter__(self) -> None:
        try:
            from lightning_utilities.core import imports
        except ImportError:
            self._imports = None
            return
        self._imports, self._real = imports, getattr(imports, "package_available", None)
        if self._real is not None:
            real = self._real
            imports.package_available = lambda name: name != "scipy" and real(name)

    def __exit__(self, *exc: object) -> None:
        if self._imports is None or self._real is None:
            return
        self._imports.package_available = self._real
        package = sys.modules.get(PACKAGE)
        if package is not None and getattr(package, "package_available", None) is not None:
            package.package_available = self._real


def _remove(finder: _Finder) -> None:
    if finder in sys.meta_path:
        sys.meta_path.remove(finder)
