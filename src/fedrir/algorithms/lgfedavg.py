"""LG-FedAvg: Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov, Morency. "Think Locally,
Act Globally: Federated Learning with Local and Global Representations", arXiv:2001.01523, 2020.

The global layers (the linear head) are shared and averaged; the local representation (the body,
with its BatchNorm layers) stays on the client. Trained jointly with one optimizer.

New clients: no zero-shot evaluation (the body is personal); the adaptation trains a body under
the frozen shared head.
"""

from __future__ import annotations

from fedrir.algorithms.baseline import Baseline


class LGFedAvg(Baseline):
    """Personal body, shared head."""

    name = "lgfedavg"
    shared = ("head.",)
