"""Flower adapter: the fedrir algorithms inside a Flower ServerApp and ClientApp.

Thin by design: :mod:`.strategy` turns Flower's round loop into calls of the algorithm contract,
:mod:`.records` converts payloads and states to ``ArrayRecord``s, :mod:`.app` holds the apps that
``flwr run`` loads, and :mod:`.runner` runs them on Flower's simulation engine for ``fedrir run
--engine flower``. Importing this package does not import Flower.
"""
