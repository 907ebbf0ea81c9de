"""The `appliance` command: typer sub-apps per user job, one error path for all of them."""

from __future__ import annotations

import sys
import traceback
from datetime import UTC, datetime
from pathlib import Path

import typer
from typer.exceptions import TyperException

from appliance import __version__
from appliance.cli import audit as audit_cli
from appliance.cli import audit_log as audit_log_cli
from appliance.cli import bundle as bundle_cli
from appliance.cli import core as core_cli
from appliance.cli import dr as dr_cli
from appliance.cli import edge as edge_cli
from appliance.cli import lab as lab_cli
from appliance.cli import license as license_cli
from appliance.cli import pki as pki_cli
from appliance.cli import site as site_cli
from appliance.cli.output import err_console, print_error
from appliance.errors import ApplianceError, ExitCode
from edge_image.errors import ImageError
from runtime.common.yamldoc import InvalidFile

app = typer.Typer(
    name="appliance",
    help=(
        "Membria Appliance: provision core nodes, image edge laptops, replicate to S3 and audit it all.\n\n"
        "Start with `appliance site validate examples/lab.yaml`, then `appliance lab up`."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(site_cli.app, name="site")
app.add_typer(lab_cli.app, name="lab")
app.add_typer(pki_cli.app, name="pki")
app.add_typer(audit_cli.app, name="audit")
app.add_typer(audit_log_cli.app, name="audit-log")
app.add_typer(license_cli.app, name="license")
app.add_typer(edge_cli.app, name="edge")
app.add_typer(dr_cli.app, name="dr")
app.add_typer(core_cli.app, name="core")
app.add_typer(bundle_cli.app, name="bundle")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"appliance {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Membria Appliance control plane."""


def _crash_log(exc: BaseException) -> Path:
    """Keep the traceback for developers in a file; the user sees one line."""
    directory = Path.home() / ".cache" / "membria"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"crash-{datetime.now(UTC):%Y%m%dT%H%M%S}.log"
    path.write_text("".join(traceback.format_exception(exc)))
    return path


def main() -> None:
    try:
        result = app(standalone_mode=False)
        # Without standalone mode click returns the exit code of `typer.Exit` instead of exiting.
        sys.exit(result if isinstance(result, int) else 0)
    except ApplianceError as exc:
        print_error(exc.message, hint=exc.hint)
        sys.exit(int(exc.exit_code))
    except ImageError as exc:  # edge_image knows nothing of ApplianceError; its exit codes are the same
        print_error(exc.message, hint=exc.hint)
        sys.exit(exc.exit_code)
    except InvalidFile as exc:  # runtime.common knows nothing of ApplianceError; a bad file is bad input
        print_error(exc.message)
        sys.exit(int(ExitCode.BAD_INPUT))
    except typer.Abort:
        err_console.print("Aborted.")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("Interrupted.")
        sys.exit(130)
    except TyperException as exc:
        # Usage errors (missing argument, bad option). Typer vendors its own click, so these are not
        # click.ClickException; TyperException is their public base.
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            print_error(exc.format_message())
        sys.exit(int(ExitCode.BAD_INPUT))
    except Exception as exc:  # noqa: BLE001 - anything unexpected: a crash log, never a traceback
        log = _crash_log(exc)
        print_error(f"internal error: {type(exc).__name__}: {exc}", hint=f"details written to {log}")
        sys.exit(int(ExitCode.CHECK_FAILED))
