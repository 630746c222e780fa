"""Non-IID partitioners: which client each pooled sample goes to (PFLlib's protocol).

A partitioner is shaped like Flower's ``DirichletPartitioner``: a small class whose settings and
seed are fixed in the constructor, which owns its numpy ``Generator``, and which retries a bounded
number of times before giving up with a one-line :class:`DataError`. Calling it with the pooled
labels (and domains, for the ``natural`` split) returns one sorted int64 index array per client;
every sample lands in exactly one client. A second call continues the same random stream: build a
new partitioner with the same seed to repeat a split.

- ``iid``: a seeded shuffle split as evenly as possible.
- ``pat``: pathological, each client holds exactly C classes with unbalanced counts (PFLlib).
- ``dir``: per class, Dirichlet(α) shares across clients; a client already holding its fair share
  N/clients gets nothing more; redrawn until every client meets a minimum size (PFLlib, after
  Yurochkin et al., ICML 2019).
- ``exdir``: each client first gets C labels, then each label is split by Dirichlet(α) over the
  clients that own it ("#C=k" then Dirichlet; Li et al., ICDE 2022, as PFLlib runs it).
- ``natural``: one client per domain (feature shift: OfficeCaltech10, DomainNet).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from fedrir.config import DataConfig
from fedrir.errors import ConfigError, DataError

IntArray = npt.NDArray[np.int64]


def default_classes_per_client(num_classes: int) -> int:
    """PFLlib's usual C: 2 for 10-class data, 10 for CIFAR-100."""
    return max(2, num_classes // 10)


class Partitioner(ABC):
    """Assigns every sample to one of ``num_clients`` clients, reproducibly from ``seed``."""

    name: ClassVar[str]

    def __init__(self, num_clients: int, seed: int) -> None:
        if num_clients < 1:
            raise ConfigError(f"{self.name} partition: need at least 1 client, got {num_clients}")
        self.num_clients = num_clients
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    @classmethod
    def from_config(
        cls, cfg: DataConfig, num_classes: int, seed: int, batch_size: int
    ) -> Partitioner:
        """Build this partitioner from the run's data settings (by default: clients and seed)."""
        return cls(cfg.clients, seed)

    @abstractmethod
    def _assign(self, labels: IntArray, domains: IntArray | None) -> IntArray:
        """The client of every sample, as an int64 array the length of ``labels``."""

    def __call__(
        self, labels: npt.ArrayLike, domains: npt.ArrayLike | None = None
    ) -> list[IntArray]:
        """One sorted int64 index array per client; together they hold every sample once."""
        y = np.asarray(labels, dtype=np.int64)
        d = None if domains is None else np.asarray(domains, dtype=np.int64)
        if y.ndim != 1 or (d is not None and d.shape != y.shape):
            raise DataError(
                f"{self.name} partition: labels must be 1-D and domains the same shape, "
                f"got {y.shape} and {None if d is None else d.shape}"
            )
        if len(y) < self.num_clients:
            raise DataError(
                f"{self.name} partition: cannot give {self.num_clients} clients a sample each "
                f"from {len(y)} samples; use at most {len(y)} clients"
            )
        owner = self._assign(y, d)
        # A stable sort of the sample ids by owner yields each client's ids already in order.
        order = np.argsort(owner, kind="stable")
        sizes = np.bincount(owner, minlength=self.num_clients)
        parts = np.split(order.astype(np.int64), np.cumsum(sizes)[:-1])
        assert len(parts) == self.num_clients and sizes.min() > 0, sizes
        return parts


class _ClassPartitioner(Partitioner):
    """A partitioner that splits by class label, so it must know how many classes there are."""

    def __init__(self, num_clients: int, num_classes: int, seed: int) -> None:
        super().__init__(num_clients, seed)
        if num_classes < 1:
            raise ConfigError(f"{self.name} partition: need at least 1 class, got {num_classes}")
        self.num_classes = num_classes

    def _class_members(self, labels: IntArray) -> list[IntArray]:
        """Each class's sample ids, shuffled (so a class's share to a client is a random subset)."""
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise DataError(
                f"{self.name} partition: labels must lie in [0, {self.num_classes}), "
                f"found {labels.min()}..{labels.max()}"
            )
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=self.num_classes)
        return [self._rng.permutation(m) for m in np.split(order, np.cumsum(counts)[:-1])]


def _owners_from_shares(members: list[IntArray], shares: IntArray, n: int) -> IntArray:
    """Turn per-class client counts ``shares[k, c]`` into the client of every sample."""
    owner = np.empty(n, dtype=np.int64)
    clients = np.arange(shares.shape[1])
    for k, ids in enumerate(members):
        owner[ids] = np.repeat(clients, shares[k])
    return owner


def _dirichlet_counts(
    rng: np.random.Generator, n: int, alpha: float, eligible: IntArray, sizes: IntArray, cap: float
) -> IntArray:
    """Split ``n`` samples over the ``eligible`` clients by Dirichlet(α) shares (PFLlib's rule).

    Clients already holding ``cap`` (= N / clients) samples get a zero share so that no client
    swallows the pool; if every eligible client is full, the plain shares are used. When the
    shares of all the clients with room underflow to zero (tiny α), one of them takes the class
    whole: the α → 0 limit of a Dirichlet draw.
    """
    p = np.zeros(len(sizes))
    p[eligible] = rng.dirichlet(np.full(len(eligible), alpha))
    room = p * (sizes < cap)
    open_ = eligible[sizes[eligible] < cap]
    if room.sum() > 0:
        p = room
    elif len(open_) > 0 or p.sum() == 0:
        p = np.zeros(len(sizes))
        p[rng.choice(open_ if len(open_) > 0 else eligible)] = 1.0
    # Cuts at the rounded cumulative shares: unlike PFLlib's truncation, which hands the last
    # client a stray sample of nearly every class, no client is favoured. Dividing by the last
    # partial sum makes every cut after the last non-zero share exactly n.
    cum = np.cumsum(p)
    cuts = np.rint(cum / cum[-1] * n).astype(np.int64)[:-1]
    return np.diff(np.concatenate(([0], cuts, [n])))


class IidPartitioner(Partitioner):
    """A seeded shuffle split into near-equal parts (sizes differ by at most one)."""

    name = "iid"

    def _assign(self, labels: IntArray, domains: IntArray | None) -> IntArray:
        n = len(labels)
        owner = np.empty(n, dtype=np.int64)
        owner[self._rng.permutation(n)] = np.arange(n) * self.num_clients // n
        return owner


class PathologicalPartitioner(_ClassPartitioner):
    """PFLlib's ``pat``: every client holds exactly C distinct classes, in unbalanced amounts.

    Class ownership is dealt round-robin over a random order of the classes: client i takes the C
    classes at positions iC … iC + C − 1 (mod K). So every client gets C distinct classes, every
    class is owned (when clients · C ≥ K), and owner counts differ by at most one between classes —
    PFLlib's "for each class, take clients that still need classes" without its uneven leftovers.
    Within a class, all owners but one draw a size uniformly in [⌈n/m/10⌉, n/m) and the remaining
    owner (chosen at random) takes the rest, as PFLlib draws them. clients · C < K would leave a
    class, and its samples, with no client: that is an error here (PFLlib crashes on it).
    """

    name = "pat"

    def __init__(
        self, num_clients: int, num_classes: int, classes_per_client: int, seed: int
    ) -> None:
        super().__init__(num_clients, num_classes, seed)
        if classes_per_client < 1:
            raise ConfigError(
                f"pat partition: classes_per_client must be >= 1, got {classes_per_client}"
            )
        if classes_per_client > num_classes:
            raise DataError(
                f"pat partition: {classes_per_client} classes per client asked but the dataset has "
                f"only {num_classes}; set classes_per_client to at most {num_classes}"
            )
        if num_clients * classes_per_client < num_classes:
            raise DataError(
                f"pat partition: {num_clients} clients × {classes_per_client} classes cannot cover "
                f"all {num_classes} classes (some samples would belong to no client); use at least "
                f"{math.ceil(num_classes / classes_per_client)} clients or more classes per client"
            )
        self.classes_per_client = classes_per_client

    @classmethod
    def from_config(
        cls, cfg: DataConfig, num_classes: int, seed: int, batch_size: int
    ) -> Partitioner:
        c = cfg.classes_per_client or default_classes_per_client(num_classes)
        return cls(cfg.clients, num_classes, c, seed)

    def class_sets(self) -> IntArray:
        """The classes of every client, ``[clients, C]``, dealt round-robin from a random order."""
        order = self._rng.permutation(self.num_classes)
        slots = np.arange(self.num_clients * self.classes_per_client) % self.num_classes
        return order[slots].reshape(self.num_clients, self.classes_per_client)

    def _assign(self, labels: IntArray, domains: IntArray | None) -> IntArray:
        members = self._class_members(labels)
        sets = self.class_sets()
        shares = np.zeros((self.num_classes, self.num_clients), dtype=np.int64)
        for k, ids in enumerate(members):
            owners = np.flatnonzero((sets == k).any(axis=1))
            n, m = len(ids), len(owners)
            if n < m:
                raise DataError(
                    f"pat partition: class {k} has {n} samples but {m} clients should hold it; "
                    "use fewer clients or fewer classes per client"
                )
            per = n / m
            low = max(math.ceil(per / 10), 1)
            sizes = self._rng.integers(low, max(int(per), low + 1), size=m - 1)
            sizes = np.append(sizes, n - sizes.sum())
            shares[k, owners] = self._rng.permutation(sizes)
        return _owners_from_shares(members, shares, len(labels))


class DirichletPartitioner(_ClassPartitioner):
    """PFLlib's ``dir``: per class, Dirichlet(α) shares across all clients.

    Classes are dealt in order; a client already holding ≥ N/clients samples gets no share of
    the next classes. The whole draw is repeated until every client holds at least
    ``min(batch_size / (1 − train_ratio), N / clients / 2)`` samples (PFLlib's rule: a full batch
    of local test data, or half the average when that is smaller) or ``min_samples`` when given,
    at most ``max_retries`` times.
    """

    name = "dir"

    def __init__(
        self,
        num_clients: int,
        num_classes: int,
        alpha: float,
        seed: int,
        batch_size: int = 100,
        train_ratio: float = 0.75,
        max_retries: int = 1000,
        min_samples: int = 0,
    ) -> None:
        super().__init__(num_clients, num_classes, seed)
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ConfigError(f"dir partition: alpha must be a positive number, got {alpha}")
        if batch_size < 1 or not 0 < train_ratio < 1 or max_retries < 1:
            raise ConfigError(
                "dir partition: need batch_size >= 1, 0 < train_ratio < 1 and max_retries >= 1, "
                f"got {batch_size}, {train_ratio}, {max_retries}"
            )
        self.alpha = alpha
        self.batch_size = batch_size
        self.train_ratio = train_ratio
        self.max_retries = max_retries
        self.min_samples = min_samples

    @classmethod
    def from_config(
        cls, cfg: DataConfig, num_classes: int, seed: int, batch_size: int
    ) -> Partitioner:
        return cls(
            cfg.clients,
            num_classes,
            cfg.alpha,
            seed,
            batch_size,
            cfg.train_ratio,
            min_samples=cfg.min_samples,
        )

    def min_size(self, n: int) -> int:
        """The smallest client accepted for a pool of ``n`` samples (PFLlib's rule by default)."""
        if self.min_samples:
            return self.min_samples
        return max(1, int(min(self.batch_size / (1 - self.train_ratio), n / self.num_clients / 2)))

    def _assign(self, labels: IntArray, domains: IntArray | None) -> IntArray:
        members = self._class_members(labels)
        n, need = len(labels), self.min_size(len(labels))
        everyone = np.arange(self.num_clients)
        best = 0
        for _ in range(self.max_retries):
            shares = np.zeros((self.num_classes, self.num_clients), dtype=np.int64)
            sizes = np.zeros(self.num_clients, dtype=np.int64)
            for k, ids in enumerate(members):
                shares[k] = _dirichlet_counts(
                    self._rng, len(ids), self.alpha, everyone, sizes, n / self.num_clients
                )
                sizes += shares[k]
            if sizes.min() >= need:
                return _owners_from_shares(members, shares, n)
            best = max(best, int(sizes.min()))
        raise DataError(
            f"dir partition: {self.max_retries} draws with alpha={self.alpha} over "
            f"{self.num_clients} clients never gave every client {need} of the {n} samples "
            f"(at best the smallest had {best}); use fewer clients, a larger alpha, more data, "
            f"or set --min-samples below {need}"
            + ("" if self.min_samples else " (or a smaller batch_size, which sets PFLlib's rule)")
        )


class ExDirichletPartitioner(_ClassPartitioner):
    """PFLlib's ``exdir`` (NIID-Bench's "#C=k" followed by Dirichlet; Li et al., ICDE 2022).

    Each client first draws C distinct labels at random; the draw is steered so that every label
    is owned (the clients dealt last must take still-unowned labels when otherwise some would be
    left over), and it is redrawn until each label has at least max(C · clients // K // 2, 1)
    owners (PFLlib's rule). Each label's samples are then split by Dirichlet(α) over its owners,
    with the same "full clients get no more" rule as ``dir``. Both levels are redrawn together
    until every client holds ``min_size`` samples (10 in NIID-Bench, capped at half the average
    client so that tiny pools stay feasible), at most ``max_retries`` times. A client may end up
    with fewer than C labels when a Dirichlet share rounds to zero.
    """

    name = "exdir"

    def __init__(
        self,
        num_clients: int,
        num_classes: int,
        classes_per_client: int,
        alpha: float,
        seed: int,
        min_size: int = 10,
        max_retries: int = 1000,
    ) -> None:
        super().__init__(num_clients, num_classes, seed)
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ConfigError(f"exdir partition: alpha must be a positive number, got {alpha}")
        if classes_per_client < 1 or min_size < 1 or max_retries < 1:
            raise ConfigError(
                "exdir partition: need classes_per_client, min_size and max_retries >= 1, "
                f"got {classes_per_client}, {min_size}, {max_retries}"
            )
        if classes_per_client > num_classes:
            raise DataError(
                f"exdir partition: {classes_per_client} classes per client asked but the dataset "
                f"has only {num_classes}; set classes_per_client to at most {num_classes}"
            )
        if num_clients * classes_per_client < num_classes:
            raise DataError(
                f"exdir partition: {num_clients} clients × {classes_per_client} classes cannot "
                f"cover all {num_classes} classes; use at least "
                f"{math.ceil(num_classes / classes_per_client)} clients or more classes per client"
            )
        self.classes_per_client = classes_per_client
        self.alpha = alpha
        self.min_size = min_size
        self.max_retries = max_retries

    @classmethod
    def from_config(
        cls, cfg: DataConfig, num_classes: int, seed: int, batch_size: int
    ) -> Partitioner:
        c = cfg.classes_per_client or default_classes_per_client(num_classes)
        return cls(cfg.clients, num_classes, c, cfg.alpha, seed)

    def label_owners(self) -> npt.NDArray[np.bool_]:
        """``owns[k, c]``: whether client c drew label k; every label has at least one owner."""
        k_all, c = self.num_classes, self.classes_per_client
        owns = np.zeros((k_all, self.num_clients), dtype=bool)
        for i in range(self.num_clients):
            unowned = np.flatnonzero(~owns.any(axis=1))
            forced = max(0, len(unowned) - (self.num_clients - 1 - i) * c)
            picked = self._rng.choice(unowned, forced, replace=False)
            others = np.setdiff1d(np.arange(k_all), picked)
            owns[picked, i] = True
            owns[self._rng.choice(others, c - forced, replace=False), i] = True
        return owns

    def _assign(self, labels: IntArray, domains: IntArray | None) -> IntArray:
        members = self._class_members(labels)
        n = len(labels)
        need = max(1, min(self.min_size, n // (2 * self.num_clients)))
        need_owners = max(self.classes_per_client * self.num_clients // self.num_classes // 2, 1)
        best = 0
        for _ in range(self.max_retries):
            owns = self.label_owners()
            if owns.sum(axis=1).min() < need_owners:
                continue
            shares = np.zeros((self.num_classes, self.num_clients), dtype=np.int64)
            sizes = np.zeros(self.num_clients, dtype=np.int64)
            for k, ids in enumerate(members):
                shares[k] = _dirichlet_counts(
                    self._rng,
                    len(ids),
                    self.alpha,
                    np.flatnonzero(owns[k]),
                    sizes,
                    n / self.num_clients,
                )
                sizes += shares[k]
            if sizes.min() >= need:
                return _owners_from_shares(members, shares, n)
            best = max(best, int(sizes.min()))
        raise DataError(
            f"exdir partition: {self.max_retries} draws with alpha={self.alpha} and "
            f"{self.classes_per_client} classes per client never gave all {self.num_clients} "
            f"clients {need} samples and every label {need_owners} owner(s) (at best the "
            f"smallest had {best}); use fewer clients, a larger alpha or more classes per client"
        )


class NaturalPartitioner(Partitioner):
    """One client per domain (natural feature shift); client i holds the i-th domain id."""

    name = "natural"

    def _assign(self, labels: IntArray, domains: IntArray | None) -> IntArray:
        if domains is None:
            raise DataError(
                "natural partition: this dataset has no domains to give one client each; "
                "use a multi-domain dataset (e.g. officecaltech10, domainnet) or iid/pat/dir/exdir"
            )
        ids, owner = np.unique(domains, return_inverse=True)
        if len(ids) != self.num_clients:
            raise DataError(
                f"natural partition: the dataset has {len(ids)} domains, one client each, "
                f"but {self.num_clients} clients were asked; set clients = {len(ids)}"
            )
        return owner.astype(np.int64)


PARTITIONERS: dict[str, type[Partitioner]] = {
    cls.name: cls
    for cls in (
        IidPartitioner,
        PathologicalPartitioner,
        DirichletPartitioner,
        ExDirichletPartitioner,
        NaturalPartitioner,
    )
}
"""Every partitioner by its configuration name."""


def make_partitioner(
    cfg: DataConfig, num_classes: int, seed: int, batch_size: int = 100
) -> Partitioner:
    """The partitioner ``cfg.partition`` names, with the run's settings (``batch_size`` for dir)."""
    cls = PARTITIONERS.get(cfg.partition)
    if cls is None:
        raise ConfigError(
            f"invalid value for 'partition': {cfg.partition!r} is not one of "
            f"{', '.join(PARTITIONERS)}"
        )
    return cls.from_config(cfg, num_classes, seed, batch_size)
