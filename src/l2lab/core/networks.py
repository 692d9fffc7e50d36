"""Any ``nn.Module`` as the network: build what ``model._target_`` names, for the data.

A network is an importable class or factory. The data hands it its input shape and class count
under the keyword names its constructor accepts (``in_shape``, ``in_channels``, ``num_classes``),
and the config's other keys as they are. Every way this can go wrong is told in one paragraph
naming the key before any training: a target that does not import, one that is not a network, a
constructor that refuses a key, an output that is not (batch, classes). Which targets may be
named at all is ``rules.network_error``'s rule; whether they build is this module's.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from l2lab.base import ConfigError

#: The keyword names under which the data's facts reach a constructor that accepts them.
DATA_KEYS = ("in_shape", "in_channels", "num_classes")


def import_target(target: str) -> Any:
    """The object ``target`` names (``package.module.Name``, or a nested attribute), or a
    ConfigError naming the module it looked for."""
    parts = target.split(".")
    error: Exception | None = None
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and not module_name.startswith(e.name) and e.name != module_name:
                raise ConfigError(f"model._target_={target}: importing {module_name} failed: "
                                  f"{e}. Install what it needs.") from None
            error = error or e
            continue
        except Exception as e:  # noqa: BLE001 - the user's module raised while importing
            raise ConfigError(f"model._target_={target}: importing {module_name} raised "
                              f"{type(e).__name__}: {e}") from None
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            raise ConfigError(f"model._target_={target}: module {module_name} has no "
                              f"{'.'.join(parts[cut:])}.") from None
        return obj
    raise ConfigError(f"model._target_={target}: no module named {parts[0]!r} (looked for "
                      f"{'.'.join(parts[:-1])}): is its package installed, or on PYTHONPATH? "
                      f"({error})")


def _accepted(obj: Any) -> tuple[list[str], list[str], bool]:
    """The keyword names ``obj``'s constructor takes, those without a default, and whether it
    takes ``**kwargs``."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return [], [], True
    named = [p for p in sig.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return ([p.name for p in named], [p.name for p in named if p.default is p.empty],
            any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()))


def network_factory(model: Mapping[str, Any],
                    instantiate: Callable[[dict], Callable[..., Any]] | None = None
                    ) -> Callable[..., nn.Module]:
    """A function (in_shape, num_classes, dropout=None) -> the network ``model`` (a resolved
    ``model`` config: ``_target_``, ``name`` and the constructor's keys) describes.

    ``instantiate`` (the config layer's ``hydra.utils.instantiate(..., _partial_=True)``) builds
    nested ``_target_`` keys; without it the keys go to the constructor as they are.
    """
    keys = {k: v for k, v in model.items() if k not in ("_target_", "name")}
    target = str(model["_target_"])
    obj = import_target(target)
    if not callable(obj):
        raise ConfigError(f"model._target_={target} is a {type(obj).__name__}, not an nn.Module "
                          "class or a function that returns one.")
    accepted, required, open_keys = _accepted(obj)
    refused = [k for k in keys if k not in accepted] if not open_keys else []
    if refused:
        raise ConfigError(
            f"model.{refused[0]}: {target} does not accept {', '.join(refused)}; it accepts "
            f"{', '.join(accepted) or 'no keyword'}. (Overriding model._target_ keeps the "
            "preset's keys: start from model=custom for a network of your own.)")
    data_keys = [k for k in DATA_KEYS if k in accepted] or (["num_classes"] if open_keys else [])
    if missing := [k for k in required if k not in keys and k not in data_keys]:
        raise ConfigError(
            f"model: {target} needs {', '.join(missing)}, which neither the config nor the data "
            f"gives (the data gives {', '.join(DATA_KEYS)} to a constructor that names them); "
            f"add +model.{missing[0]}=...")
    build = instantiate({"_target_": target, **keys}) if instantiate else None

    def make(in_shape: Sequence[int], num_classes: int, dropout: float | None = None
             ) -> nn.Module:
        facts = {"in_shape": tuple(int(d) for d in in_shape), "in_channels": int(in_shape[0]),
                 "num_classes": int(num_classes)}
        given = {k: facts[k] for k in data_keys}
        if dropout is not None and ("dropout" in accepted or "dropout" in keys):
            given["dropout"] = dropout
        try:
            net = build(**given) if build else obj(**{**keys, **given})
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's constructor: tell it in one line
            cause = e.__cause__ if isinstance(e.__cause__, ConfigError) else None
            if cause is not None:
                raise cause from None
            raise ConfigError(f"model: building {target}({', '.join({**keys, **given})}) raised "
                              f"{type(e).__name__}: {e}") from None
        if not isinstance(net, nn.Module):
            raise ConfigError(f"model._target_={target} returned a {type(net).__name__}, not "
                              "an nn.Module.")
        return net

    return make


def check_output(net: nn.Module, example: torch.Tensor, num_classes: int, target: str) -> None:
    """One forward of two examples in eval mode, every state left as it was: the output must be
    (batch, classes) logits, or a ConfigError says what it was."""
    rng = torch.get_rng_state()
    mode = net.training
    x = example[:2]
    try:
        with torch.no_grad():
            out = net.eval()(x)
    except Exception as e:  # noqa: BLE001 - the user's forward
        raise ConfigError(f"model: {target}'s forward on inputs of shape {tuple(x.shape)} "
                          f"raised {type(e).__name__}: {e}") from None
    finally:
        net.train(mode)
        torch.set_rng_state(rng)
    if not torch.is_tensor(out) or tuple(out.shape) != (len(x), num_classes):
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ConfigError(f"model: {target} must return logits of shape (batch, classes) = "
                          f"{(len(x), num_classes)} for inputs of shape {tuple(x.shape)}; it "
                          f"returned {got}.")


#: Layers that normalize what they are given: a layer whose output goes straight into one is
#: scale-invariant (van Laarhoven 2017), so L2 on it acts through its effective learning rate.
NORMALIZATIONS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                  nn.modules.instancenorm._InstanceNorm)


def followed_by_norm(net: nn.Module, example: torch.Tensor) -> list[str]:
    """The weighted layers whose output the network next hands to a normalization, in the order
    one forward (eval mode, two examples, every state left as it was) calls its leaves:
    parameter-free leaves between them (an activation) do not count, any other does."""
    calls: list[tuple[str, nn.Module]] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o, name=name: calls.append((name, mod)))
             for name, m in net.named_modules() if name and not list(m.children())]
    rng, mode = torch.get_rng_state(), net.training
    try:
        with torch.no_grad():
            net.eval()(example[:2])
    finally:
        for h in hooks:
            h.remove()
        net.train(mode)
        torch.set_rng_state(rng)
    weighted = [(n, m) for n, m in calls if any(True for _ in m.parameters(recurse=False))
                or isinstance(m, NORMALIZATIONS)]
    return [n for (n, m), (_, after) in zip(weighted, weighted[1:], strict=False)
            if isinstance(after, NORMALIZATIONS) and not isinstance(m, NORMALIZATIONS)]
