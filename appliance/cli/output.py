"""Shared rich consoles and message helpers for every CLI command."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def print_error(message: str, *, hint: str | None = None) -> None:
    # soft_wrap: multi-line messages (one `FILE:LINE: ...` issue a line) must not be broken at the terminal width.
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    if hint:
        err_console.print(f"[dim]hint:[/] {escape(hint)}")


def print_ok(message: str) -> None:
    console.print(f"[green]✓[/] {escape(message)}")
