"""FedAvg-FT: FedAvg (McMahan et al., AISTATS 2017) followed by local fine-tuning.

Training and communication are FedAvg's. To evaluate, each client fine-tunes a copy of the global
model on its training set for ``ft_epochs`` epochs (fresh optimizer), the usual "FedAvg + FT"
personalization baseline (e.g. Oh et al., ICLR 2022); the stored client state is not changed.

New clients: zero-shot and global evaluation are the global model before fine-tuning; nothing is
private, so the adapted score is that of the fine-tuned global model (its evaluation).
"""

from __future__ import annotations

from fedrir.algorithms.fedavg import FedAvg


class FedAvgFT(FedAvg):
    """FedAvg, fine-tuned locally before every evaluation."""

    name = "fedavg-ft"
    settings = frozenset({"ft_epochs"})
    fine_tune = True
