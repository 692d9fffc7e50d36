"""Every private name of MLflow, Hydra, OmegaConf, Lightning and torchmetrics that l2lab uses, one
module per library, each headed by the versions it was checked against. ``tests/test_compat.py``
imports and exercises every name, so a release that moves one fails there, by name, not deep in a
sweep; ``pyproject.toml`` bounds each library above at the next minor version (torchmetrics,
Lightning's dependency and not l2lab's, is not bounded: its hook falls back to the plain import)."""
