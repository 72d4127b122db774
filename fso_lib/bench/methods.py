"""The methods raced in the benchmark (thesis §6.6), behind one registry.

A :class:`Method` knows its default hyperparameters, the domain a hyperparameter search explores for it,
and how to build an optimizer for a model. SGD, SGD with momentum and Adam come from ``torch.optim``; the
chapter-6 methods (centering, batch norm, ACP, K-FAC, natural neural networks) come from ``fso_lib.optim``
(imported plainly) through its factory ``make_optimizer(name, model, **hyperparameters)``; this module never re-implements them.

Every method also tunes the initialization scale (``init_scale``), as the thesis does (§2.3, §4.1).

Search domains (:data:`DOMAINS`): each method's important knobs, log-uniform for step sizes, damping and
Adam's ε; momentum (uniform in [0.5, 0.99]) for the methods that use it by default (SGD + momentum,
K-FAC); for K-FAC also the options of Martens & Grosse (2015): ``kl_clip`` (off, or log-uniform),
``damping_adaptation`` and ``step_rule`` when :class:`fso_lib.optim.KFAC` accepts them. ACP's α mode is
covered by the two methods ``acp`` (heuristic α) and ``acp_fixed_alpha`` (α = 1): for a fixed α the update
depends on (η/α, ε/α) only, so searching η and ε with α = 1 covers every fixed α (checked in
``tests/test_bench.py``). ``kfac_thesis`` is K-FAC with the thesis's protocol: statistics and inverses
every 100 updates from a separate minibatch of the run's size (200), no running average.
``acp_quadratic_model`` and ``natural_nn_quadratic_model``: ACP (heuristic α) and the implicit natural neural
network with Martens & Grosse's quadratic-model step rule (:class:`fso_lib.optim.quadratic_model.QuadraticModelSteps`),
searching ε and whether to adapt it (their lr is ignored).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .. import optim as fso_optim
from ..search import Choice, Domain, Param

INIT_SCALE = Param("init_scale", 0.25, 4.0, log=True)
MOMENTUM = Param("momentum", 0.5, 0.99)


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
    Domain([Param("lr", 1e-3, 1.0, log=True), INIT_SCALE]),
    _torch(lambda params, hp: torch.optim.SGD(params, lr=hp["lr"])),
))
register_method(Method(
    "sgd_momentum", "SGD + momentum", {"lr": 0.003, "momentum": 0.9},
    Domain([Param("lr", 1e-4, 0.3, log=True), MOMENTUM, INIT_SCALE]),
    _torch(lambda params, hp: torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"])),
))
register_method(Method(
    "adam", "Adam", {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
    Domain([Param("lr", 1e-5, 1e-1, log=True), Param("eps", 1e-8, 1e-1, log=True), INIT_SCALE]),
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

#: Every method of the race: the thesis's eight, Adam, SGD + momentum, the thesis-protocol K-FAC, ACP and the natural
#: neural network with Martens & Grosse's quadratic-model step (issue 12), and EKFAC, Shampoo and SOAP (issue 14).
#: The natural neural network is raced in its implicit form: the same updates as ``natural_nn`` (tested equal in
#: float64, tests/test_inverse.py) without the whitened layers' extra GEMMs in the forward and backward passes.
RACE_METHODS = ("sgd", "sgd_momentum", "adam", "centered_gd", "mean_only_batchnorm", "batchnorm", "acp",
                "acp_fixed_alpha", "kfac", "kfac_thesis", "natural_nn_implicit", "acp_quadratic_model",
                "natural_nn_quadratic_model", "ekfac", "shampoo", "soap")


def _chapter6_build(name: str):
    def build(model: nn.Module, hp: dict) -> Built:
        model = fso_optim.prepare_model(name, model)  # batch norm: a copy with BN layers; NNN: whitened
        # no host read per step: the runner reads the optimizer's non-finite flag at each evaluation (every entry of
        # OPTIMIZERS accepts check_every; torch's optimizers have no flag and ignore it)
        return Built(model, fso_optim.make_optimizer(name, model, **{**hp, "check_every": None}))
    return build


def kfac_options() -> set[str]:
    """The keyword arguments :class:`fso_lib.optim.KFAC` accepts (its options differ between versions)."""
    return set(inspect.signature(fso_optim.KFAC.__init__).parameters) - {"self", "model"}


def quadratic_model_options() -> set[str]:
    """The options of Martens & Grosse's quadratic model that ACP and the natural neural network accept."""
    return {"loss", "step_rule", "damping_adaptation", "damping_adaptation_period", "damping_bounds", "damped_rho",
            "quadratic_model_examples"}


def _kfac_domain() -> list:
    """K-FAC's knobs: η, ε, μ, and Martens & Grosse's options where the optimizer has them."""
    params = [Param("lr", 1e-3, 1.0, log=True), Param("damping", 1e-3, 10.0, log=True), MOMENTUM]
    options = kfac_options()
    if "kl_clip" in options:
        params.append(Param("kl_clip", 1e-4, 1.0, log=True, none_fraction=0.5))
    if "damping_adaptation" in options:
        params.append(Choice("damping_adaptation", [False, True]))
    if "step_rule" in options:
        params.append(Choice("step_rule", ["fixed", "quadratic_model"]))
    return params


def chapter6_domains() -> dict[str, list]:
    """The search domain of every chapter-6 method, without ``init_scale`` (added to all)."""
    lr = Param("lr", 1e-3, 3.0, log=True)
    return {
        "centered_gd": [lr],
        "mean_only_batchnorm": [lr],
        "batchnorm": [lr],
        "acp": [lr, Param("damping", 1e-3, 10.0, log=True)],
        "acp_fixed_alpha": [lr, Param("damping", 1e-3, 10.0, log=True)],
        "kfac": _kfac_domain(),
        "kfac_thesis": _kfac_domain(),
        "natural_nn": [Param("lr", 1e-3, 1.0, log=True), Param("damping", 1e-3, 1.0, log=True)],
        "natural_nn_implicit": [Param("lr", 1e-3, 1.0, log=True), Param("damping", 1e-3, 1.0, log=True)],
        # Martens & Grosse's step rule picks the step length itself (lr is ignored): ε and the LM adaptation are the knobs
        "acp_quadratic_model": [Param("damping", 1e-4, 10.0, log=True), Choice("damping_adaptation", [False, True])],
        "natural_nn_quadratic_model": [Param("damping", 1e-4, 1.0, log=True), Choice("damping_adaptation", [False, True])],
    }


#: The thesis's K-FAC protocol (§6.5.1, §6.6): statistics and inverses every 100 updates, no running average
#: (``fso_lib.optim.kfac.KFAC_THESIS_PROTOCOL``; the statistics minibatch is the run's minibatch size, 200).
KFAC_THESIS_PROTOCOL = dict(getattr(fso_optim.kfac, "KFAC_THESIS_PROTOCOL",
                                    {"statistics_period": 100, "inverse_period": 100, "running_average": 0.0}))


def register_chapter6_methods() -> None:
    """(Re-)register the chapter-6 methods with the defaults that ``fso_lib.optim.OPTIMIZERS`` publishes,
    and ``kfac_thesis`` (K-FAC with :data:`KFAC_THESIS_PROTOCOL`)."""
    domains = chapter6_domains()
    entries = [(name, name, label, {}) for name, label in CHAPTER6_METHODS.items()]
    entries.append(("kfac_thesis", "kfac", "K-FAC, thesis protocol", KFAC_THESIS_PROTOCOL))
    if "natural_nn_implicit" in fso_optim.OPTIMIZERS:  # the same updates as natural_nn on plain layers; the race uses it
        entries.append(("natural_nn_implicit", "natural_nn_implicit", "natural neural network (implicit)", {}))
    # issue 12: Martens & Grosse's quadratic-model step (and, if the search picks it, their adaptive damping) offered to
    # ACP and the natural neural network as separate methods, so that the race measures what it changes
    quadratic = {"step_rule": "quadratic_model"}
    entries.append(("acp_quadratic_model", "acp", "ACP, quadratic-model step", quadratic))
    entries.append(("natural_nn_quadratic_model", "natural_nn_implicit", "natural NN, quadratic-model step", quadratic))
    for name, optimizer, label, fixed in entries:
        spec = fso_optim.OPTIMIZERS[optimizer]
        defaults = {**spec.defaults, **fixed}
        domain = domains[name]
        searched = {p.name for p in domain}
        extra = kfac_options() if optimizer == "kfac" else quadratic_model_options() if name.endswith("quadratic_model") else set()
        optional = tuple(sorted((set(spec.hyperparameters) | searched | extra) - set(defaults) - {"check_every"}))
        register_method(Method(name, label, defaults, Domain([*domain, INIT_SCALE]), _chapter6_build(optimizer),
                               source="fso_lib.optim",
                               optional=optional, uses_statistics=bool(spec.uses_statistics)))


register_chapter6_methods()


def method_available(name: str) -> tuple[bool, str]:
    """Whether ``name`` is a registered method (and why not). Every registered method builds on every
    machine: the chapter-6 methods are imported from :mod:`fso_lib.optim` with this module."""
    if name not in METHODS:
        return False, f"unknown method {name!r}; registered: {sorted(METHODS)}"
    return True, ""


#: After the thesis (issue 14): EKFAC, Shampoo and SOAP, built by ``fso_lib.optim.make_optimizer``. Registered as
#: bench methods; whether they race is decided in :data:`RACE_METHODS`.
AFTER_THESIS_METHODS = {"ekfac": "EKFAC", "shampoo": "Shampoo", "soap": "SOAP"}


def after_thesis_domains() -> dict[str, list]:
    """The search domains of EKFAC, Shampoo and SOAP, without ``init_scale`` (added to all).

    EKFAC: K-FAC's knobs (η, ε, μ, ``kl_clip`` off or log-uniform, and Martens & Grosse's Levenberg–Marquardt damping
    and quadratic-model step, as K-FAC's domain has them: the race compares the two, so both get the same options);
    its ε is added to the second moments in the eigenbasis, not split as √ε over two factors (the probe that set the
    default preferred ε = 1). Shampoo: η, ε, μ; grafting is not
    searched (it changes the step's scale, hence the η range: one η range cannot serve all three) and stays at
    the registry's default, Adam grafting, so η gets Adam's range. SOAP: η and Adam's ε, as for Adam (β₁, β₂ at Adam's defaults)."""
    return {
        "ekfac": [Param("lr", 1e-3, 1.0, log=True), Param("damping", 1e-4, 10.0, log=True), MOMENTUM,
                  Param("kl_clip", 1e-4, 1.0, log=True, none_fraction=0.5),
                  Choice("damping_adaptation", [False, True]), Choice("step_rule", ["fixed", "quadratic_model"])],
        "shampoo": [Param("lr", 1e-5, 1e-1, log=True), Param("damping", 1e-8, 1e-2, log=True), MOMENTUM],
        "soap": [Param("lr", 1e-5, 1e-1, log=True), Param("eps", 1e-10, 1e-3, log=True)],
    }


#: The benchmark's amortization for Shampoo and SOAP: their roots / eigenbases every 100 updates, the period every
#: other amortized method of the race refreshes at (thesis §6.6.2). Their registry defaults (every 10 updates, as the
#: SOAP paper runs it) cost 10–11 SGD updates per update on the book's 2-core CPU (data/results/speed/), which the
#: race's equal tuning budget (24 trials × 1,500 updates per method) cannot afford there.
AFTER_THESIS_RACE_AMORTIZATION = {"shampoo": {"root_period": 100}, "soap": {"eigenbasis_period": 100}}


def register_after_thesis_methods() -> None:
    """Register EKFAC, Shampoo and SOAP with the defaults that ``fso_lib.optim.OPTIMIZERS`` publishes, except the
    refresh periods of :data:`AFTER_THESIS_RACE_AMORTIZATION`."""
    domains = after_thesis_domains()
    for name, label in AFTER_THESIS_METHODS.items():
        spec = fso_optim.OPTIMIZERS[name]
        domain = domains[name]
        optional = tuple(sorted((set(spec.hyperparameters) | {p.name for p in domain}) - set(spec.defaults) - {"check_every"}))
        defaults = {**spec.defaults, **AFTER_THESIS_RACE_AMORTIZATION.get(name, {})}
        register_method(Method(name, label, defaults, Domain([*domain, INIT_SCALE]), _chapter6_build(name),
                               source="fso_lib.optim", optional=optional, uses_statistics=bool(spec.uses_statistics)))


register_after_thesis_methods()
