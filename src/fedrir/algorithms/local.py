"""Local training only: every client trains its own model and nothing is communicated.

The lower bound of personalization: it shows what a client can learn from its own data alone.
Uploads and broadcasts are empty; the whole model and its optimizer state stay on the client.
New clients have no zero-shot evaluation; the adaptation is local training from scratch.
"""

from __future__ import annotations

from fedrir.algorithms.baseline import Baseline


class Local(Baseline):
    """No communication; each client's model is initialised from its own seed."""

    name = "local"
    shared = ()
