"""The ``facecore`` command line. Imports nothing heavy at module level, so ``--help`` is fast.

Every command turns facecore's own errors into a message and an exit code; a traceback
means a bug in facecore, not a user error.
"""

from __future__ import annotations

import importlib
import json

import click

from . import __version__
from .commands import set_option, user_errors
from .core.groups import group_names


class _GroupChoice(click.Choice):
    """The group names of ``core/groups.py``, read when the option is parsed (not at import)."""

    def __init__(self) -> None:
        super().__init__([])

    @property  # type: ignore[override]
    def choices(self) -> list[str]:
        return list(group_names())

    @choices.setter
    def choices(self, value: object) -> None:
        pass


# Commands that live in their own modules, loaded only when used (keeps --help free of torch).
LAZY_COMMANDS: dict[str, str] = {
    "train": "facecore.commands.train:train",
    "eval": "facecore.commands.eval:eval_command",
    "predict": "facecore.commands.predict:predict",
    "export": "facecore.commands.export:export",
    "pack": "facecore.commands.pack:pack",
    "demo-data": "facecore.commands.demo_data:demo_data",
    "augment-preview": "facecore.commands.augment_preview:augment_preview",
    "clean": "facecore.commands.clean:clean",
    "index": "facecore.commands.index:index",
    "identify": "facecore.commands.identify:identify",
    "compare": "facecore.commands.compare:compare_command",
}


class LazyGroup(click.Group):
    """A click group whose bigger commands are imported on first use.

    A command whose import fails for want of an optional dependency (an ImportError about a
    module outside the command's own package) is listed as unavailable, so ``--help`` still
    works, and says why when run. Any other exception, a missing module of facecore itself
    included, is a bug and propagates.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name].split(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except ImportError as exc:
                if not _missing_dependency(exc, module):
                    raise
                return _unavailable(name, f"{type(exc).__name__}: {exc}")
        return super().get_command(ctx, name)


def _missing_dependency(exc: ImportError, module: str) -> bool:
    """Whether ``exc`` is about a module outside ``module``'s package (a dependency, not the command's own code)."""
    missing = exc.name
    if missing is None:  # raised by a dependency's own import code ("needs libGL", ...)
        return True
    return missing.split(".")[0] != module.split(".")[0]


def _unavailable(name: str, reason: str) -> click.Command:
    def run(**_: object) -> None:
        raise click.ClickException(f"the '{name}' command is unavailable: {reason}")

    return click.Command(
        name,
        callback=run,
        help=f"(unavailable: {reason})",
        short_help="(unavailable: failed to load)",
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    )


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="facecore")
def main() -> None:
    """facecore: train and evaluate face-recognition models built from plugins."""


@main.command("list-plugins")
@click.option("--group", type=_GroupChoice(), help="Only this component group.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (sorted, stable) instead of a table.")
@user_errors
def list_plugins(group: str | None, as_json: bool) -> None:
    """Show installed components and broken plugins.

    One row per component: group, name, providing distribution and version, description.
    Plugins that failed to import or register are listed after the table with the reason;
    the others keep working.

    \b
    FACECORE_LOAD_PLUGINS chooses which third-party plugins load:
      unset                    all installed plugins load
      FACECORE_LOAD_PLUGINS=a,b  only distributions a and b
      FACECORE_LOAD_PLUGINS=   none (a way out when a plugin breaks startup)
    The bundled plugins (distribution facecore) always load.
    """
    from .core.plugins import broken_plugins, load_warnings, loaded_plugins, registry

    groups = [group] if group else list(group_names())
    rows = []
    for g in groups:
        for name in registry(g).names():
            reg = registry(g).entries[name]
            rows.append(
                {
                    "group": g,
                    "name": name,
                    "distribution": reg.provider.distribution,
                    "version": reg.provider.version,
                    "plugin": reg.provider.plugin,
                    "description": reg.description,
                    "options": sorted(reg.options),
                }
            )
    rows.sort(key=lambda r: (r["group"], r["name"]))
    broken = sorted(
        (dict(b.__dict__) for b in broken_plugins()),
        key=lambda b: (b["distribution"], b["plugin"], b["error"]),
    )
    warnings = load_warnings()
    if as_json:
        payload = {"components": rows, "broken": broken, "plugins": loaded_plugins(), "warnings": warnings}
        click.echo(json.dumps(payload, indent=2, sort_keys=True))
        return
    headers = ["group", "name", "distribution", "version", "description"]
    table = [[str(r[h]) for h in headers] for r in rows]
    widths = [max([len(h)] + [len(t[i]) for t in table]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip())
    for t in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip())
    if broken:
        click.echo("\nBroken plugins (set FACECORE_LOAD_PLUGINS to choose which third-party plugins load):")
        for b in broken:
            click.echo(f"  {b['plugin']} ({b['distribution']} {b['version']}".rstrip() + f"): {b['error']}")
    for w in warnings:
        click.echo(f"Warning: {w}", err=True)


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML config file.")
@set_option
@click.option("--print", "print_config", is_flag=True, help="Print the effective config (defaults filled).")
@user_errors
def validate(config_path: str, overrides: tuple[str, ...], print_config: bool) -> None:
    """Check a config (and overrides) against the core schema and the selected plugins' options.

    Prints OK and exits 0, or lists every problem (dotted key path, value, expectation)
    and exits 2. With --print, prints the effective config: overrides applied, defaults
    filled, keys in schema order.
    """
    from .core.config import dump_config, load_config

    config = load_config(config_path, overrides)
    if print_config:
        click.echo(dump_config(config), nl=False)
    else:
        suffix = f" (with {len(overrides)} --set override(s))" if overrides else ""
        click.echo(f"OK: {config_path} is valid{suffix}")


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Also add the options of the plugins this config names.")
@user_errors
def schema(config_path: str | None) -> None:
    """Print the config's JSON Schema: the core keys, the keys that name plugins, and with --config the options
    of the plugins that config names."""
    from .core.config import compose_schema, core_schema, read_yaml

    out = compose_schema(read_yaml(config_path))[0] if config_path else core_schema()
    click.echo(json.dumps(out, indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
