"""The methods raced in the benchmark (thesis §6.6), behind one registry.

A :class:`Method` knows its default hyperparameters, the domain a hyperparameter search explores for it,
and how to build an optimizer for a model. SGD, SGD with momentum and Adam come from ``torch.optim``; the
chapter-6 methods (centering, batch norm, ACP, K-FAC, natural neural networks) come from ``fso_lib.optim``
(imported plainly) through its factory ``make_optimizer(name, model, **hyperparameters)``; this module never re-implements them.

Every method may also tune the initialization scale (``init_scale``), as the thesis does (§2.3, §4.1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import optim as fso_optim
from ..search import Domain, Param

INIT_SCALE = Param("init_scale", 0.25, 4.0, log=True)


@dataclass
class Built:
    """What a run trains: the model (possibly re-parametrized by the method) and its optimizer."""

    model: nn.Module
    optimizer: torch.optim.Optimizer


@dataclass
class Method:
    name: str
    label: str
    defaults: dict
    domain: Domain
    build: Callable[[nn.Module, dict], Built]
    source: str = "torch.optim"
    optional: tuple = ()  # hyperparameters that may be given but have no default
    uses_statistics: bool = False  # needs ``optimizer.update_statistics(x)`` on a separate minibatch

    def hyperparameters(self, overrides: dict | None = None) -> dict:
        """The defaults updated by ``overrides``; unknown names are refused (a typo should not be silent)."""
        overrides = dict(overrides or {})
        unknown = set(overrides) - set(self.defaults) - set(self.optional)
        if unknown and self.defaults:  # a method that publishes no defaults takes any name
            raise ValueError(f"{self.name}: unknown hyperparameters {sorted(unknown)}; known: {sorted(self.defaults)}.")
        return {**self.defaults, **overrides}


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"Unknown method {name!r}; registered: {sorted(METHODS)}.") from None


def _torch(factory):
    def build(model: nn.Module, hp: dict) -> Built:
        return Built(model, factory(model.parameters(), hp))
    return build


register_method(Method(
    "sgd", "SGD", {"lr": 0.01},
    Domain([Param("lr", 1e-4, 1.0, log=True), INIT_SCALE]),
    _torch(lambda params, hp: torch.optim.SGD(params, lr=hp["lr"])),
))
register_method(Method(
    "sgd_momentum", "SGD + momentum", {"lr": 0.003, "momentum": 0.9},
    Domain([Param("lr", 1e-5, 0.3, log=True), Param("momentum", 0.5, 0.99), INIT_SCALE]),
    _torch(lambda params, hp: torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"])),
))
register_method(Method(
    "adam", "Adam", {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
    Domain([Param("lr", 1e-5, 1e-1, log=True), INIT_SCALE]),
    _torch(lambda params, hp: torch.optim.Adam(params, lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"])),
))

#: The chapter-6 methods, built by ``fso_lib.optim.make_optimizer``.
CHAPTER6_METHODS = {
    "centered_gd": "centered gradient descent",
    "mean_only_batchnorm": "mean-only batch norm",
    "batchnorm": "batch norm",
    "acp": "ACP",
    "acp_fixed_alpha": "ACP, fixed α",
    "kfac": "K-FAC",
    "natural_nn": "natural neural network",
}


def _chapter6_build(name: str):
    def build(model: nn.Module, hp: dict) -> Built:
        model = fso_optim.prepare_model(name, model)  # batch norm: a copy with BN layers; NNN: whitened
        spec = fso_optim.OPTIMIZERS[name]
        if isinstance(spec.build, type) and issubclass(spec.build, fso_optim.LayerwiseOptimizer):
            # no host read per step: the runner reads the optimizer's non-finite flag at each evaluation
            hp = {**hp, "check_every": None}
        return Built(model, fso_optim.make_optimizer(name, model, **hp))
    return build


#: Search domains of the chapter-6 methods' extra hyperparameters (all log-uniform).
CHAPTER6_DOMAINS = {
    "damping": Param("damping", 1e-4, 1.0, log=True),
}


def register_chapter6_methods() -> None:
    """(Re-)register the chapter-6 methods with the defaults that ``fso_lib.optim.OPTIMIZERS`` publishes."""
    for name, label in CHAPTER6_METHODS.items():
        spec = fso_optim.OPTIMIZERS[name]
        defaults = dict(spec.defaults)
        optional = tuple(k for k in spec.hyperparameters if k not in defaults)
        params = [Param("lr", 1e-5, 1.0, log=True)]
        params += [CHAPTER6_DOMAINS[k] for k in CHAPTER6_DOMAINS if k in defaults]
        register_method(Method(name, label, defaults, Domain([*params, INIT_SCALE]), _chapter6_build(name),
                               source="fso_lib.optim",
                               optional=optional, uses_statistics=bool(spec.uses_statistics)))


register_chapter6_methods()


def method_available(name: str) -> tuple[bool, str]:
    """Whether ``name`` is a registered method (and why not). Every registered method builds on every
    machine: the chapter-6 methods are imported from :mod:`fso_lib.optim` with this module."""
    if name not in METHODS:
        return False, f"unknown method {name!r}; registered: {sorted(METHODS)}"
    return True, ""
