"""OmegaConf's private names that l2lab uses.

Checked against omegaconf 2.3.1 (``pyproject.toml``: ``omegaconf>=2.3,<2.4``).
"""

from __future__ import annotations

from typing import Any

CHECKED_WITH = "omegaconf 2.3.1"


def yaml_str_representer() -> Any:
    """The representer ``OmegaConf.to_yaml`` uses for strings (it quotes strings that YAML would
    read back as another type): the fast libyaml dumper of ``config/composing.py`` registers it,
    so that its documents are the ones ``OmegaConf.to_yaml`` writes."""
    from omegaconf._utils import OmegaConfDumper

    return OmegaConfDumper.str_representer


def child_node(cfg: Any, key: str) -> Any:
    """A DictConfig's child node as stored, interpolations unresolved (``cfg[key]`` would
    resolve them): the command-line check walks the schema's keys with it."""
    return cfg._get_node(key)
