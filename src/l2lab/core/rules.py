"""What exists, written once: the datasets, networks, activations and layer types the harness
knows. Torch-free on purpose: ``config/schema.py`` checks a config against these lists in about a
second, before torch is imported, and ``core/`` builds from the same lists.
"""

from __future__ import annotations

#: ``data.name``: the datasets ``core.data.load_data`` loads (``conf/data/<name>.yaml`` each).
DATASETS: tuple[str, ...] = ("digits", "mnist1d", "mnist", "fashion_mnist", "cifar10")

#: ``model=<name>`` -> its class: the networks the harness builds and stacks.
NETWORKS: dict[str, str] = {"mlp": "l2lab.models.MLP", "cnn": "l2lab.models.CNN"}

#: ``model.activation`` -> its ``torch.nn`` class name.
ACTIVATIONS: dict[str, str] = {"relu": "ReLU", "tanh": "Tanh", "gelu": "GELU",
                               "sigmoid": "Sigmoid"}

#: ``regularization.types``: the layer classes a selection can penalise (also its default).
LAYER_TYPES: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d")


def network_error(target: object) -> str | None:
    """Why ``model._target_`` is not a network the harness builds (None: it is)."""
    if target in NETWORKS.values():
        return None
    names = ", ".join(f"model={k}" for k in NETWORKS)
    return (f"model._target_ must be a network of l2lab.models ({names}: "
            f"{', '.join(NETWORKS.values())}); got {target!r}.")
