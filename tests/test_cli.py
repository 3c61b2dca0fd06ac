"""The core CLI: fast --help/--version, list-plugins, validate, and the lazy command group."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import yaml
from click.testing import CliRunner

import facecore
from facecore import cli, hookimpl
from facecore.core.config import load_config

BACKBONE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"width": {"type": "integer", "minimum": 1, "default": 4}},
}


def _tiny(embedding_size, width=4):
    return (embedding_size, width)


class CliPlugin:
    @hookimpl
    def register_backbones(self, register):
        register("t-cli-backbone", _tiny, schema=BACKBONE_SCHEMA, description="A backbone for CLI tests")
        register("t-cli-another", _tiny, schema=BACKBONE_SCHEMA, description="Another one")


class RaisingPlugin:
    @hookimpl
    def register_heads(self, register):
        raise RuntimeError("exploded on purpose")


def _run(*args: str):
    return CliRunner().invoke(cli.main, list(args))


# --- --help and --version stay light ----------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["list-plugins", "--help"], ["validate", "--help"]])
def test_help_and_version_do_not_import_torch_or_numpy(args):
    code = textwrap.dedent(f"""
        import sys
        from facecore.cli import main
        try:
            main({args!r}, prog_name="facecore")
        except SystemExit as exit:
            code = exit.code
        heavy = sorted(m for m in ("torch", "numpy") if m in sys.modules)
        print("HEAVY:", heavy, "EXIT:", code)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY: [] EXIT: 0" in out.stdout, out.stdout + out.stderr
    if args == ["--version"]:
        assert facecore.__version__ in out.stdout


def test_list_plugins_help_documents_facecore_load_plugins():
    result = _run("list-plugins", "--help")
    assert result.exit_code == 0
    assert "FACECORE_LOAD_PLUGINS" in result.output and "always load" in result.output


# --- list-plugins ------------------------------------------------------------------------


def test_list_plugins_json_lists_components_with_providers(register_plugin):
    register_plugin(CliPlugin(), name="cli-plugin")
    register_plugin(RaisingPlugin(), name="raising-plugin")
    result = _run("list-plugins", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = {(c["group"], c["name"]): c for c in data["components"]}
    row = rows[("backbones", "t-cli-backbone")]
    assert row["distribution"] == "(in-process)" and row["plugin"] == "cli-plugin"
    assert row["description"] == "A backbone for CLI tests" and row["options"] == ["width"]
    keys = [(c["group"], c["name"]) for c in data["components"]]
    assert keys == sorted(keys)
    broken = [b for b in data["broken"] if b["plugin"] == "raising-plugin"]
    assert broken and "RuntimeError: exploded on purpose" in broken[0]["error"]
    assert any(p["name"] == "cli-plugin" and p["hooks"] == ["register_backbones"] for p in data["plugins"])
    again = _run("list-plugins", "--json")
    assert again.stdout == result.stdout  # stable


def test_list_plugins_group_filter(register_plugin):
    register_plugin(CliPlugin())
    data = json.loads(_run("list-plugins", "--json", "--group", "backbones").stdout)
    assert data["components"] and {c["group"] for c in data["components"]} == {"backbones"}
    assert _run("list-plugins", "--group", "losses").exit_code == 2


def test_list_plugins_table_shows_components_and_broken_plugins(register_plugin):
    register_plugin(CliPlugin(), name="cli-plugin")
    register_plugin(RaisingPlugin(), name="raising-plugin")
    result = _run("list-plugins")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["GROUP", "NAME", "DISTRIBUTION", "VERSION", "DESCRIPTION"]
    assert any(line.split()[:3] == ["backbones", "t-cli-backbone", "(in-process)"] for line in lines)
    assert "Broken plugins" in result.stdout
    assert "raising-plugin" in result.stdout and "exploded on purpose" in result.stdout


# --- validate ----------------------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path, register_plugin):
    register_plugin(CliPlugin())
    eval_dataset = [n for n in facecore.available("datasets") if n == "bin-pairs"]
    train_dataset = [n for n in facecore.available("datasets") if n == "recordio"]
    if not (eval_dataset and train_dataset and "arcface" in facecore.available("heads")):
        pytest.skip("bundled recordio / bin-pairs / arcface not installed yet")
    path = tmp_path / "config.yaml"
    path.write_text("model: {backbone: t-cli-backbone, width: 2}\ndata: {root: /data}\ntraining: {lr: 0.1}\n")
    return path


def test_validate_ok(config_file):
    result = _run("validate", "--config", str(config_file))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("OK")


def test_validate_print_shows_the_effective_config(config_file):
    result = _run("validate", "--config", str(config_file), "--print", "--set", "training.lr=0.05")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed == load_config(config_file, ["training.lr=0.05"])
    assert printed["training"]["lr"] == 0.05 and printed["model"]["width"] == 2
    assert printed["training"]["epochs"] >= 1 and "eval" in printed  # defaults filled in
    assert list(printed)[:3] == ["seed", "deterministic", "device"]


def test_validate_reports_every_error_with_exit_2(config_file):
    config_file.write_text("model: {backbone: t-cli-backbone, width: 0}\ndata: {root: /d}\ntraning: {}\n")
    result = _run("validate", "--config", str(config_file), "--set", "training.lr=abc")
    assert result.exit_code == 2
    assert "Traceback" not in result.output and result.stdout == ""
    for expected in ("model.width: must be >= 1, got 0", 'traning: unknown key; did you mean "training"?',
                     'training.lr: must be a number, got "abc"'):
        assert expected in result.stderr


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda p: None, "config file not found"),
        (lambda p: p.write_text("model: [1,\n"), "not valid YAML at line"),
        (lambda p: p.write_text("- a\n- b\n"), "got a list"),
        (lambda p: p.write_bytes(b"\x80\x81binary"), "not a UTF-8 text file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text("{" * 5000), "nested more than 64 levels deep"),  # the parser would recurse
        (lambda p: p.write_text("a: " + "[" * 3000 + "]" * 3000), "nested more than 64 levels deep"),
        (lambda p: p.write_text("a: " + "[" * 200 + "]" * 200), "nested more than 64 levels deep"),  # parses
    ],
    ids=["missing", "yaml-syntax", "top-level-list", "binary", "directory", "deep-unclosed", "deep-list", "deep-parsed"],
)
def test_validate_user_errors_have_no_traceback(tmp_path, setup, expected):
    path = tmp_path / "config.yaml"
    setup(path)
    result = _run("validate", "--config", str(path))
    assert result.exit_code == 2
    assert expected in result.stderr and "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("command", ["validate", "train"])
@pytest.mark.parametrize("reader", ["bin-pairs", "ijb"])
def test_an_evaluation_set_named_as_the_training_set_is_a_config_error(command, reader, tmp_path):
    result = _run(command, "--config", "configs/quickstart.yaml", "--set", f"data.type={reader}",
                  "--set", f"checkpoint.save_dir={tmp_path / 'runs'}")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"data.type: dataset '{reader}' is not a training set" in result.stderr
    assert "these fit: image-folder, recordio" in result.stderr
    assert "data.path" not in result.stderr  # no cascade from the reader's own options
    assert not (tmp_path / "runs").exists()


def test_validate_bad_override_syntax(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {backbone: x}\n")
    result = _run("validate", "--config", str(path), "--set", "training.lr")
    assert result.exit_code == 2 and "key.path=value" in result.stderr


def test_validate_in_a_subprocess_prints_no_traceback(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: -1\nmodel: {backbone: nope}\n")
    out = subprocess.run([sys.executable, "-m", "facecore.cli", "validate", "--config", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "seed: must be >= 0, got -1" in out.stderr and "model.backbone: unknown backbone 'nope'" in out.stderr
    assert "Traceback" not in out.stderr


# --- the lazy command group --------------------------------------------------------------


def test_lazy_commands_load_on_use_and_a_missing_dependency_does_not_take_the_cli_down(monkeypatch, tmp_path):
    package = tmp_path / "fc_cli_fake"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "good.py").write_text(
        "import click\n@click.command()\ndef hello():\n    'Say hello.'\n    click.echo('hello')\n"
    )
    (package / "bad.py").write_text("raise ImportError('needs onnx')\n")
    (package / "nodep.py").write_text("import fc_cli_not_installed_dependency\n")
    (package / "buggy.py").write_text("undefined_name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "LAZY_COMMANDS", {
        **cli.LAZY_COMMANDS,
        "hello": "fc_cli_fake.good:hello",
        "broken": "fc_cli_fake.bad:cmd",
        "nodep": "fc_cli_fake.nodep:cmd",
        "absent": "fc_cli_fake.absent:cmd",
        "buggy": "fc_cli_fake.buggy:cmd",
    })
    try:
        names = cli.main.list_commands(None)
        assert {"hello", "broken", "absent"} <= set(names)
        assert {"list-plugins", "validate"} <= set(names)
        assert _run("hello").stdout == "hello\n"
        broken = _run("broken", "--anything")
        assert broken.exit_code == 1 and "needs onnx" in broken.output
        nodep = _run("nodep")
        assert nodep.exit_code == 1 and "No module named 'fc_cli_not_installed_dependency'" in nodep.output
        # the command's own package missing a module, or a NameError, is a bug: it surfaces
        with pytest.raises(ModuleNotFoundError):
            cli.main.get_command(None, "absent")
        with pytest.raises(NameError):
            cli.main.get_command(None, "buggy")
        monkeypatch.setattr(cli, "LAZY_COMMANDS", {k: v for k, v in cli.LAZY_COMMANDS.items()
                                                   if k not in ("absent", "buggy")})
        helped = _run("--help")
        assert helped.exit_code == 0 and "unavailable" in helped.stdout
    finally:
        for name in ("fc_cli_fake", "fc_cli_fake.good", "fc_cli_fake.bad", "fc_cli_fake.nodep",
                     "fc_cli_fake.buggy"):
            sys.modules.pop(name, None)
