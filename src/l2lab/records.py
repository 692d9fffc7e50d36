"""A run as the report reads it: plain values, below both the store and the report.

``tracking`` reads runs out of MLflow into :class:`RunRecord`; ``report`` computes the table,
the figures and the verdicts from them. Neither knows the other: the report can be tested on
synthetic records with known answers and re-run offline on exported data, and the store can be
read without matplotlib or scipy. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: The run tag that holds a run's failure reason (:attr:`RunRecord.failure`: why it ended FAILED
#: or KILLED, design.md §4): written by ``tracking``, named by the report where it points there.
FAILURE_TAG = "l2lab.failure"


@dataclass
class RunRecord:
    """One training run, already flattened out of the tracking store."""

    run_id: str
    name: str  # readable run name, e.g. "lam=0.01 seed=1"
    status: str  # "FINISHED" | "FAILED" | "KILLED" | "RUNNING"
    swept: dict[str, str]  # swept keys other than `seed`; may be {}
    lam: float  # regularization.lam of the run (>= 0)
    seed: int
    failure: str | None = None  # reason, for FAILED runs
    final: dict[str, float] = field(default_factory=dict)  # last-epoch metric values
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> points
    experiment_id: str = ""  # for links into the MLflow UI
    #: The layers the run's selection penalised (param ``l2.layers``), in order; None where not
    #: logged (a run rejected before building, a synthetic record): what was penalised, and
    #: whether λ = 0 under two selections is one training, are then judged by the label alone.
    layers: tuple[str, ...] | None = None
    #: ``regularization.lam_per_layer``: pattern -> λ, first match wins (a layer no pattern
    #: matches gets ``lam``). Non-zero entries penalise layers even at ``lam`` = 0.
    lam_per_layer: dict[str, float] = field(default_factory=dict)
