"""FedAvg: McMahan, Moore, Ramage, Hampson, Agüera y Arcas. "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017.

The whole model travels (parameters and BatchNorm buffers); the server takes the sample-weighted
mean; clients are evaluated with the global model. Only the optimizer state stays on the client.

New clients: zero-shot and global evaluation are the global model; nothing is private, so the
adapted score is the global model's too.
"""

from __future__ import annotations

from fedrir.algorithms.baseline import Baseline


class FedAvg(Baseline):
    """Everything shared, nothing personal."""

    name = "fedavg"
    shared = ("body.", "head.")
    global_model = ""
