"""Progress display shared by the long commands (bundle build, edge build/verify/flash): byte bars and sizes."""

from __future__ import annotations

from collections.abc import Callable

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from appliance.cli.output import console


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


class ByteBar:
    """A byte progress bar, gone once full or closed (an error midway must not leave it drawn)."""

    def __init__(self, label: str, total: int) -> None:
        self.progress = Progress(
            TextColumn(label),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task = self.progress.add_task(label, total=total)
        self.total, self.done, self.running = total, 0, False
        if total > 0:
            self.progress.start()
            self.running = True

    def __call__(self, n: int) -> None:
        self.done += n
        self.progress.update(self.task, advance=n)
        if self.done >= self.total:
            self.close()

    def close(self) -> None:
        if self.running:
            self.progress.stop()
            self.running = False

    def __enter__(self) -> ByteBar:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def byte_bar(label: str, total: int) -> ByteBar:
    return ByteBar(label, total)


def totals_bar(label: str) -> Callable[[int, int], None]:
    """A bar for callers that report (done, total) rather than increments."""
    state: dict[str, Callable[[int], None]] = {}
    last = [0]

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = byte_bar(label, total)
        state["bar"](done - last[0])
        last[0] = done

    return update
