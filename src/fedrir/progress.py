"""Progress bars on the terminal: one over a run's rounds, one over a whole compare grid."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from fedrir.config import Config
from fedrir.results import RoundRecord


class Progress:
    """A progress bar over rounds showing the latest accuracy and the time per round."""

    def __init__(self, config: Config, start: int, enabled: bool, out: Path | None) -> None:
        self.bar = tqdm(
            total=config.rounds,
            initial=start,
            desc=f"{config.algorithm} on {config.data.dataset}",
            unit="round",
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        if enabled and out is not None:
            self.bar.write(f"fedrir: writing to {out}/", file=sys.stderr)

    def __call__(self, record: RoundRecord | None, round_: int) -> None:
        if record is not None:
            self.bar.set_postfix(
                acc=f"{100 * record.accuracy:.2f}%", s_per_round=f"{record.seconds:.1f}"
            )
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class GridProgress:
    """One bar over every round of the grid, showing the run in flight and its latest accuracy."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(
            total=total,
            desc="compare",
            unit="round",
            disable=not enabled,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        self.run = ""

    def start(self, algorithm: str, seed: int) -> None:
        self.run = f"{algorithm} seed {seed}"
        self.bar.set_postfix_str(self.run)

    def skip_to(self, position: int) -> None:
        """Move to grid round ``position`` without counting the rounds passed as work done now
        (they ran in an earlier session), so the rate and the time left are this session's."""
        if self.bar.disable:  # a disabled tqdm keeps no counts
            return
        self.bar.initial += position - self.bar.n
        self.bar.n = self.bar.last_print_n = position
        self.bar.refresh()

    def ran(self, position: int, record: RoundRecord | None) -> None:
        """Grid round ``position`` has just run; ``record`` is its evaluation, if it had one.
        Unreported rounds before it were restored from a checkpoint."""
        self.skip_to(position - 1)
        if record is not None:
            self.bar.set_postfix_str(f"{self.run} acc {100 * record.accuracy:.2f}%")
        self.bar.update(1)

    def note(self, text: str) -> None:
        """A line above the bar (nothing when the bar is off)."""
        if not self.bar.disable:
            self.bar.write(f"fedrir: {text}", file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
