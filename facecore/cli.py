"""The ``facecore`` command line. Imports nothing heavy at module level, so ``--help`` is fast.

Every command turns facecore's own errors into a message and an exit code; a traceback
means a bug in facecore, not a user error.
"""

from __future__ import annotations

import importlib
import importlib.util
import json

import click

from . import __version__
from .commands import set_option, user_errors

GROUP_CHOICES = ["backbones", "heads", "datasets", "schedulers", "metrics"]


# Commands that live in their own modules, loaded only when used (keeps --help free of torch).
LAZY_COMMANDS: dict[str, str] = {
    "train": "facecore.commands.train:train",
    "eval": "facecore.commands.eval:eval_command",
    "predict": "facecore.commands.predict:predict",
    "export": "facecore.commands.export:export",
    "pack": "facecore.commands.pack:pack",
    "demo-data": "facecore.commands.demo_data:demo_data",
}


class LazyGroup(click.Group):
    """A click group whose bigger commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        present = {n for n, t in LAZY_COMMANDS.items() if importlib.util.find_spec(t.split(":")[0])}
        return sorted(set(super().list_commands(ctx)) | present)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.list_commands(ctx) and name in LAZY_COMMANDS:
            module, attr = LAZY_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="facecore")
def main() -> None:
    """facecore: train and evaluate face-recognition models built from plugins."""


@main.command("list-plugins")
@click.option("--group", type=click.Choice(GROUP_CHOICES), help="Only this component group.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@user_errors
def list_plugins(group: str | None, as_json: bool) -> None:
    """Show installed components: group, name, provider, version, description; and broken plugins."""
    from .plugins import broken_plugins, registry

    groups = [group] if group else GROUP_CHOICES
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
    broken = [b.__dict__ for b in broken_plugins()]
    if as_json:
        click.echo(json.dumps({"components": rows, "broken": broken}, indent=2))
        return
    headers = ["group", "name", "distribution", "version", "description"]
    table = [[r[h] for h in headers] for r in rows]
    widths = [max([len(h)] + [len(str(t[i])) for t in table]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths)).rstrip())
    for t in table:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(t, widths)).rstrip())
    if broken:
        click.echo("\nBroken plugins (set FACECORE_LOAD_PLUGINS to choose which third-party plugins load):")
        for b in broken:
            click.echo(f"  {b['plugin']} ({b['distribution']} {b['version']}): {b['error']}")


@main.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML config file.")
@set_option
@click.option("--print", "print_config", is_flag=True, help="Print the effective config (defaults filled).")
@user_errors
def validate(config_path: str, overrides: tuple[str, ...], print_config: bool) -> None:
    """Check a config (and overrides) against the core schema and the selected plugins' options."""
    from .config import dump_config, load_config

    config = load_config(config_path, overrides)
    if print_config:
        click.echo(dump_config(config), nl=False)
    else:
        click.echo(f"OK: {config_path} is valid")


if __name__ == "__main__":  # pragma: no cover
    main()
