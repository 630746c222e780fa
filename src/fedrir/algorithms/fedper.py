"""FedPer: Arivazhagan, Aggarwal, Singh, Choudhary. "Federated Learning with Personalization
Layers", arXiv:1912.00818, 2019.

The body (the GFE-architecture encoder, with its BatchNorm buffers) is shared and averaged; the
linear head is personal. Body and head are trained together with one optimizer.

New clients: no zero-shot evaluation (the head is personal); the adaptation trains a head from
the client's initial one on the frozen shared body (a linear probe of the representation).
"""

from __future__ import annotations

from fedrir.algorithms.baseline import Baseline


class FedPer(Baseline):
    """Shared body, personal head, trained jointly."""

    name = "fedper"
    shared = ("body.",)
