"""The `dsm` typer application: its root options (-v, -q, --log-format, --version), help without
Python types, and `command`, which registers a command with the options every command shares."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any

import typer

from .etcd import ETCD_PARAMETERS, etcd_args
from .options import LOG_FORMAT_HELP, OUTPUT_PARAMETERS, Quiet, Verbose
from .output import emit
from .verbosity import set_verbosity


def _plain_help(option: Any) -> Any:
    """The --help flag without a `<bool>` type in help (our own flags set an empty metavar)."""
    if option is not None:
        option.metavar = ""
    return option


class _Command(typer.core.TyperCommand):
    """Help with metavars only: recent typer also prints each parameter's Python type (`<bool>`,
    `<path>`, `<list[Path]>`), which options drop when they have a metavar, and arguments here."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.param_type_name == "argument" and hasattr(param, "display_type_rich"):
                param.display_type_rich = lambda ctx: None

    def get_help_option(self, ctx: Any) -> Any:
        return _plain_help(super().get_help_option(ctx))


class _Group(typer.core.TyperGroup):
    def get_help_option(self, ctx: Any) -> Any:
        return _plain_help(super().get_help_option(ctx))

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for param in params:  # Typer's --install-completion / --show-completion flags
            if param.name in ("install_completion", "show_completion"):
                _plain_help(param)
        return params


app = typer.Typer(
    name="dsm",
    cls=_Group,
    help="Declarative state machines in YAML, run embedded or by workers coordinated through etcd v3.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

DISTRIBUTION = "dsm-workflow"  # the name on the package index (the package and the command are `dsm`)


def _version() -> str:
    """The installed distribution's version; the package's own when run from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        import dsm

        return dsm.__version__


def _show_version(value: bool) -> None:
    if value:
        emit(f"dsm {_version()}\n")
        raise typer.Exit()


@app.callback()
def _root(verbose: Verbose = False, quiet: Quiet = False,
          log_format: Annotated[str | None, typer.Option(
              "--log-format", envvar="DSM_LOG_FORMAT", metavar="text|json", show_default="text",
              help=LOG_FORMAT_HELP + " Also after the command's name. (DSM_LOG_FORMAT)")] = None,
          version: Annotated[bool, typer.Option("--version", metavar="", is_eager=True, callback=_show_version,
                                                help="Print dsm's version and exit.")] = False) -> None:
    set_verbosity(verbose, quiet, log_format)  # --version is handled by its eager callback


def group(name: str, help: str) -> typer.Typer:
    """A group of commands under `dsm NAME` (`dsm schedule create`, ...): register them with
    `command(..., on=group)`."""
    sub = typer.Typer(name=name, cls=_Group, help=help, no_args_is_help=True, pretty_exceptions_enable=False,
                      context_settings={"help_option_names": ["-h", "--help"]})
    app.add_typer(sub)
    return sub


def command(name: str | None = None, *, etcd: bool = False,
            on: typer.Typer | None = None) -> Callable[[Callable[..., Any]], Any]:
    """Register a command with the options every command shares: -v / -q (also accepted after the
    command's name) and, with `etcd=True`, the etcd connection options, collected into one `EtcdArgs`
    passed as its `etcd` parameter, so every etcd command spells them the same way. `on`: the
    group it belongs to (`group`); the root by default."""

    def decorate(func: Callable[..., Any]) -> Any:
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if not (etcd and p.name == "etcd")]
        extra = OUTPUT_PARAMETERS + (ETCD_PARAMETERS if etcd else [])

        @functools.wraps(func)
        def run(**values: Any) -> Any:
            set_verbosity(values.pop("verbose"), values.pop("quiet"), values.pop("log_format"))
            if etcd:
                values["etcd"] = etcd_args(values)
            return func(**values)

        parameters = own + extra
        run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        return (on or app).command(name, cls=_Command)(run)

    return decorate
