"""Settings of the entropic optimal-transport solver (:func:`otcclip.models.ot.ot_distance`)."""

from __future__ import annotations

from dataclasses import dataclass

from otcclip.models.config.base import Settings, check, setting

MARGINALS = ("uniform", "relevance")
METHODS = ("auto", "log_sinkhorn", "sinkhorn")


@dataclass(frozen=True)
class OTSettings(Settings):
    """How one batch of OT problems between local sets is solved.

    Passed whole from the job's settings down to the solver; see
    :func:`otcclip.models.ot.ot_distance` for what each setting does.
    """

    reg: float = setting(0.05, "entropic regularisation of the OT problems", gt=0)
    iters: int = setting(100, "Sinkhorn iteration cap", ge=1, le=100_000)
    tol: float = setting(1e-5, "Sinkhorn tolerance on the marginal error (checked every 10 steps)", ge=0)
    marginals: str = setting("uniform", "mass on patches/tokens: uniform, or relevance to the other side's global vector",
                             choices=MARGINALS)
    relevance_temp: float = setting(0.1, "softmax temperature of relevance marginals", gt=0)
    method: str = setting("auto", "solver: log-domain Sinkhorn, plain Sinkhorn, or auto (plain only where it is stable)",
                          choices=METHODS)
    debias: bool = setting(False, "debiased Sinkhorn divergence OT(X,Y) - (OT(X,X) + OT(Y,Y)) / 2 instead of OT(X,Y), so "
                                  "a set is at distance ~0 from itself (three solves per problem)")
    reg_relative: bool = setting(False, "reg is a share of each problem's cost spread (max - min cost) instead of an "
                                        "absolute value")

    def __post_init__(self) -> None:
        check(self)
