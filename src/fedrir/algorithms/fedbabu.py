"""FedBABU: Oh, Kim, Yun. "FedBABU: Toward Enhanced Representation for Federated Image
Classification", ICLR 2022.

The head is initialised once from the server seed (one common random head) and never trained
during federated training: the server holds and broadcasts it, but only the body (with its
BatchNorm buffers) is trained, uploaded and averaged. To evaluate, each client fine-tunes the whole
model for ``ft_epochs`` epochs, as the paper does; the stored client state is not changed.

New clients: zero-shot and global evaluation are the global body under the common random head,
before fine-tuning; nothing is private, so the adapted score is that of the fine-tuned model.
"""

from __future__ import annotations

from torch import nn

from fedrir.algorithms.baseline import Baseline


class FedBABU(Baseline):
    """Shared body trained under a fixed random head; fine-tuned before evaluation."""

    name = "fedbabu"
    settings = frozenset({"ft_epochs"})
    shared = ("body.",)
    fine_tune = True
    global_model = ""

    def _server_keys(self) -> frozenset[str]:
        head = {k for k in self.modules.state_dict() if k.startswith("head.")}
        return self.upload_keys | head

    def _param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"local": list(self.modules.get_submodule("body").parameters())}
