"""Progress display and metrics: a rich progress bar on a terminal, plain lines otherwise, JSON lines on disk.

Only rank 0 displays and writes. Each record in ``metrics.jsonl`` is one JSON object with a ``kind`` field
("train", "eval", "teacher", "ratios", "final"), so runs can be plotted or compared without parsing logs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import TrainingError

__all__ = ["MetricsWriter", "ProgressReporter", "format_parts"]


class MetricsWriter:
    """Append JSON records to a file, one per line, flushed at once (a crash loses at most the current line)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TrainingError(f"cannot create {self.path.parent}: {e.strerror or e}.") from None

    def write(self, kind: str, **fields: Any) -> None:
        if self.path is None:
            return
        record = {"kind": kind, "time": round(time.time(), 3), **fields}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=float) + "\n")
        except OSError as e:
            raise TrainingError(
                f"cannot append to {self.path}: {e.strerror or e}; free space or fix the folder's permissions, then "
                "rerun to resume from the last checkpoint."
            ) from None


def format_parts(values: dict[str, float]) -> str:
    """``loss=1.234 ce=0.9 ...`` with sensible precision."""
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


class ProgressReporter:
    """Show training progress; silent on ranks other than 0.

    Args:
        total_steps: optimizer steps of the whole run.
        enabled: whether this process reports (rank 0).
        rich: use a rich live progress bar (default: when stdout is a terminal).
        stream: where plain lines go.
    """

    def __init__(self, total_steps: int, *, enabled: bool = True, rich: bool | None = None, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.use_rich = enabled and (self.stream.isatty() if rich is None else rich)
        self._progress = self._task = None
        if self.use_rich:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]finetune"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self._task = self._progress.add_task("train", total=total_steps, info="")
            self._progress.start()

    def step(self, step: int, values: dict[str, Any]) -> None:
        """Report the state after optimizer step `step`."""
        if not self.enabled:
            return
        # Parts switched off (weight 0, e.g. dense training) stay in metrics.jsonl but would only clutter the line.
        text = format_parts({k: v for k, v in values.items() if v != 0})
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=text)
        else:
            print(f"step {step} {text}", file=self.stream, flush=True)

    def message(self, text: str) -> None:
        """A line that stays (epoch summaries, evaluation results)."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
