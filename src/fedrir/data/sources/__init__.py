"""One module per place a dataset comes from; :mod:`fedrir.data.datasets` names them.

Each loader returns the pooled dataset of the PFLlib protocol (train and test merged, train first)
and ends every way a user's files can be missing or wrong in a one-line ``DataError`` naming the
fix. What they share (where to look, pooling, uint8 pixels) is in :mod:`.common`.
"""
