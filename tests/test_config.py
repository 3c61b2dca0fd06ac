"""Config loading and validation: YAML, --set overrides, defaults, composed plugin schemas, messages."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from facecore import ConfigError, hookimpl
from facecore.core.config import (
    apply_overrides,
    core_schema,
    dump_config,
    load_config,
    parse_override,
    read_yaml,
    section_options,
    spec_name_options,
    validate_config,
    yaml_load,
)
from facecore.core.plugins import registry

ROOT = Path(__file__).resolve().parents[1]


def _obj(properties: dict, required: tuple = ()) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": properties, "required": list(required)}


def _factory(**kwargs):
    return kwargs


class SlotPlugins:
    """One in-test component for every config slot, so these tests need no bundled plugin."""

    @hookimpl
    def register_backbones(self, register):
        register("t-backbone", _factory, schema=_obj({"dropout": {"type": "number", "minimum": 0, "default": 0.0}}))

    @hookimpl
    def register_heads(self, register):
        register("t-head", _factory, schema=_obj({
            "scale": {"type": "number", "exclusiveMinimum": 0, "default": 64.0},
            "margin": {"type": "number", "minimum": 0, "default": 0.5},
        }))

    @hookimpl
    def register_datasets(self, register):
        register("t-data", _factory, schema=_obj({
            "root": {"type": "string"},
            "img_size": {"type": "integer", "minimum": 16, "default": 112},
        }, required=("root",)))
        register("t-pairs", _factory, schema=_obj({"path": {"type": "string"}}, required=("path",)))

    @hookimpl
    def register_schedulers(self, register):
        register("t-sched", _factory, schema=_obj({"gamma": {"type": "number", "exclusiveMinimum": 0, "default": 0.1}}))
        register("t-needs", _factory, schema=_obj({"steps": {"type": "array"}}, required=("steps",)))

    @hookimpl
    def register_metrics(self, register):
        register("t-metric", _factory, schema=_obj({"far": {"type": "number", "maximum": 1, "default": 1e-3}}))


@pytest.fixture
def slots(register_plugin):
    register_plugin(SlotPlugins(), name="slot-plugins")


BASE = {
    "model": {"backbone": "t-backbone"},
    "head": {"type": "t-head"},
    "data": {"type": "t-data", "root": "/data"},
    "training": {"scheduler": "t-sched"},
    "eval": {"dataset": "t-pairs", "metrics": ["t-metric"]},
}


def _with(path: str, value, base: dict = BASE) -> dict:
    """A copy of ``base`` with ``path`` (dotted) set to ``value``; ``...`` deletes it."""
    config = copy.deepcopy(base)
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    if value is ...:
        node.pop(last, None)
    else:
        node[last] = value
    return config


def _errors(config: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    return info.value.errors


# --- a valid config ----------------------------------------------------------------------


def test_base_config_validates_with_core_and_plugin_defaults(slots):
    config = validate_config(BASE)
    assert config["training"]["epochs"] == core_schema()["properties"]["training"]["properties"]["epochs"]["default"]
    assert config["head"]["scale"] == 64.0 and config["head"]["margin"] == 0.5  # the plugin's defaults
    assert config["data"]["img_size"] == 112 and config["data"]["root"] == "/data"
    assert list(config)[:3] == ["seed", "deterministic", "device"]  # schema order, not insertion order
    assert BASE["model"] == {"backbone": "t-backbone"}  # the input is not modified


def test_seed_keys_validate_unchanged_with_in_test_plugins(slots):
    config = {
        "seed": 7, "deterministic": True, "device": "cuda:1",
        "model": {"backbone": "t-backbone", "embedding_size": 256},
        "head": {"type": "t-head", "num_classes": 1000, "scale": 32.0, "margin": 0.4},
        "data": {"type": "t-data", "root": "/d", "batch_size": 64, "num_workers": 0, "img_size": 112},
        "training": {"epochs": 3, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 5e-4, "momentum": 0.9,
                     "scheduler": {"name": "t-sched", "gamma": 0.5}, "warmup_epochs": 0.5, "amp": "bf16",
                     "grad_clip_norm": None, "resume": True},
        "checkpoint": {"save_dir": "ck"}, "logging": {"log_dir": "lg"},
        "eval": {"dataset": "t-pairs", "metrics": ["t-metric"], "bin_file": ["lfw.bin"], "test_batch_size": 8,
                 "eval_freq": 2},
    }
    effective = validate_config(config)
    for section, values in config.items():
        if isinstance(values, dict):
            for key, value in values.items():
                assert effective[section][key] == value, f"{section}.{key}"
        else:
            assert effective[section] == values


SEED_STYLE = """\
seed: 42
deterministic: false
device: auto
model:
  backbone: resnet50
  embedding_size: 512
head:
  type: arcface
  num_classes: 85742
  scale: 64.0
  margin: 0.5
data:
  root: /data/faces_emore
  batch_size: 128
  num_workers: 4
  img_size: 112
training:
  epochs: 20
  optimizer: sgd
  lr: 0.1
  weight_decay: 5e-4
  momentum: 0.9
  scheduler: cosine
  warmup_epochs: 1
  amp: true
  grad_clip_norm: 5.0
  resume: false
checkpoint:
  save_dir: checkpoints
logging:
  log_dir: logs
eval:
  bin_file: [lfw.bin, cfp_fp.bin, agedb_30.bin]
  test_batch_size: 256
  eval_freq: 1
"""


def test_seed_style_config_validates_unchanged_with_bundled_plugins(tmp_path):
    path = tmp_path / "seed.yaml"
    path.write_text(SEED_STYLE)
    written = yaml.safe_load(SEED_STYLE)
    written["training"]["weight_decay"] = 5e-4
    effective = load_config(path)
    for section, values in written.items():
        if isinstance(values, dict):
            assert {k: effective[section][k] for k in values} == values, section
        else:
            assert effective[section] == values


SHIPPED_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_shipped_configs_are_found():
    names = {p.name for p in SHIPPED_CONFIGS}
    assert {"quickstart.yaml", "resnet50.yaml", "fastcontextface.yaml"} <= names, names


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates_and_its_effective_form_round_trips(path):
    config = load_config(path)
    assert config["model"]["backbone"] in registry("backbones")
    assert config["head"]["type"] in registry("heads")
    assert config["data"]["type"] in registry("datasets")
    # what a run saves as config.yaml validates again to the same effective config
    assert validate_config(yaml_load(dump_config(config)), str(path)) == config


# --- bad configs: every message has the key path and the value ---------------------------

BAD = [
    # (id, dotted key, value (... deletes), expected path, expected text)
    ("type", "training.lr", "abc", "training.lr", 'must be a number, got "abc"'),
    ("bool-is-not-int", "seed", True, "seed", "must be an integer, got true (a boolean)"),
    ("enum", "training.optimizer", "adam", "training.optimizer", 'got "adam"; did you mean "adamw"?'),
    ("enum-mixed", "training.amp", "yes", "training.amp", 'one of true, false, "bf16", "fp16", got "yes"'),
    ("minimum", "data.batch_size", 0, "data.batch_size", "must be >= 1, got 0"),
    ("exclusiveMinimum", "training.lr", 0, "training.lr", "must be > 0, got 0"),
    ("maximum", "training.momentum", 1.5, "training.momentum", "must be <= 1, got 1.5"),
    ("pattern", "device", "gpu", "device", 'got "gpu"'),
    ("required", "model.backbone", ..., "model.backbone", "required key is missing"),
    ("plugin-required", "data.root", ..., "data.root", "required key is missing"),
    ("unknown-top", "traning", {"lr": 1}, "traning", 'unknown key; did you mean "training"?'),
    ("unknown-core", "training.lrr", 0.1, "training.lrr", 'did you mean "lr"?'),
    ("unknown-plugin-option", "head.margni", 0.3, "head.margni", 'did you mean "margin"?'),
    ("plugin-type", "head.scale", "big", "head.scale", 'must be a number, got "big"'),
    ("plugin-minimum", "head.margin", -0.1, "head.margin", "must be >= 0, got -0.1"),
    ("both-schemas", "data.img_size", 8, "data.img_size", "must be >= 16, got 8"),
    ("section-type", "training", 5, "training", "must be a mapping, got 5"),
    ("nullable-minimum", "head.num_classes", 1, "head.num_classes", "must be >= 2, got 1"),
    ("anyOf-scheduler", "training.scheduler", 5, "training.scheduler",
     'must be a string or a mapping with "name", got 5'),
    ("anyOf-scheduler-name", "training.scheduler", {"gamma": 0.1}, "training.scheduler.name",
     "required key is missing"),
    ("scheduler-option", "training.scheduler", {"name": "t-sched", "gama": 0.2}, "training.scheduler.gama",
     'did you mean "gamma"?'),
    ("scheduler-option-value", "training.scheduler", {"name": "t-sched", "gamma": 0}, "training.scheduler.gamma",
     "must be > 0, got 0"),
    ("scheduler-needs-options", "training.scheduler", "t-needs", "training.scheduler", "{name: t-needs, steps: ...}"),
    ("anyOf-bin-file", "eval.bin_file", 5, "eval.bin_file", "must be null, a string or a list of strings, got 5"),
    ("bin-file-item", "eval.bin_file", ["lfw.bin", 3], "eval.bin_file[1]", "must be a string, got 3"),
    ("anyOf-metric-item", "eval.metrics", ["t-metric", 7], "eval.metrics[1]",
     'must be a string or a mapping with "name", got 7'),
    ("prefixItems-metric-option", "eval.metrics", [{"name": "t-metric", "far": 2}], "eval.metrics[0].far",
     "must be <= 1, got 2"),
    ("metrics-type", "eval.metrics", "t-metric", "eval.metrics", 'must be a list, got "t-metric"'),
    ("unknown-backbone", "model.backbone", "t-backbon", "model.backbone", "did you mean 't-backbone'?"),
    ("unknown-metric", "eval.metrics", ["t-metrik"], "eval.metrics[0]", "unknown metric 't-metrik'"),
    ("unknown-scheduler", "training.scheduler", "t-schedd", "training.scheduler", "unknown scheduler 't-schedd'"),
    ("not-a-pair-reader", "eval.dataset", "t-data", "eval.dataset", "does not read pair sets"),
]


@pytest.mark.parametrize("key, value, path, text", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_messages_name_the_path_and_value(slots, key, value, path, text):
    errors = _errors(_with(key, value))
    hits = [e for e in errors if e.startswith(f"{path}:")]
    assert hits, errors
    assert any(text in e for e in hits), hits


def test_unknown_plugin_name_lists_installed_ones_without_cascading(slots):
    errors = _errors(_with("model.backbone", "nope", _with("model.width", 3)))
    assert len(errors) == 1, errors  # no "unknown key" noise for the unknown backbone's options
    assert "installed backbones:" in errors[0] and "t-backbone" in errors[0]


def test_a_bad_plugin_name_type_does_not_flag_the_plugin_options(slots):
    errors = _errors(_with("model.backbone", 5, _with("model.dropout", 0.1)))
    assert errors == ["model.backbone: must be a string, got 5 (an integer)"]


def test_every_error_is_reported_at_once(slots):
    config = _with("training.lr", "x", _with("seed", -1, _with("head.margni", 1, _with("eval.metrics", ["nope"]))))
    errors = _errors(config)
    paths = sorted(e.split(":")[0] for e in errors)
    assert paths == ["eval.metrics[0]", "head.margni", "seed", "training.lr"], errors


def test_null_section_means_defaults(slots):
    config = validate_config({**BASE, "logging": None})
    assert config["logging"]["log_dir"] == core_schema()["properties"]["logging"]["properties"]["log_dir"]["default"]


def test_scheduler_options_get_their_defaults(slots):
    config = validate_config(_with("training.scheduler", {"name": "t-sched"}))
    assert config["training"]["scheduler"] == {"name": "t-sched", "gamma": 0.1}
    assert spec_name_options(config["training"]["scheduler"]) == ("t-sched", {"gamma": 0.1})


def test_section_options_passes_only_declared_plugin_keys(slots):
    config = validate_config(BASE)
    reg = registry("datasets").get("t-data")
    assert section_options(config["data"], reg) == {"root": "/data", "img_size": 112}


# --- the schema file itself --------------------------------------------------------------


def _defaults(schema: dict, path: str = ""):
    for key, sub in schema.get("properties", {}).items():
        if "default" in sub:
            yield f"{path}{key}", sub, sub["default"]
        yield from _defaults(sub, f"{path}{key}.")


def test_core_schema_is_valid_and_its_defaults_obey_it():
    schema = core_schema()
    Draft202012Validator.check_schema(schema)
    bad = [
        (p, err.message) for p, sub, d in _defaults(schema) for err in Draft202012Validator(sub).iter_errors(d)
        if err.validator != "required"  # an empty section's default reports its required keys, by design
    ]
    assert not bad


def test_core_schema_has_every_seed_key():
    props = core_schema()["properties"]
    seed = yaml.safe_load(SEED_STYLE)
    plugin_keys = {("head", "scale"), ("head", "margin")}  # declared by the head plugins
    for section, values in seed.items():
        assert section in props
        if isinstance(values, dict):
            for key in values:
                assert (section, key) in plugin_keys or key in props[section]["properties"], f"{section}.{key}"


# --- YAML files --------------------------------------------------------------------------


def test_exponent_floats_and_duplicate_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  lr: 1e-3\n  weight_decay: 5E-4\n  epochs: 10\nname: 1e5x\n")
    data = read_yaml(path)
    assert data["training"] == {"lr": 0.001, "weight_decay": 0.0005, "epochs": 10} and data["name"] == "1e5x"
    path.write_text("training:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"line 3.*'lr' twice"):
        read_yaml(path)


@pytest.mark.parametrize(
    "content, expected",
    [
        ("model: [1, 2\n", "not valid YAML at line"),
        ("- model\n- head\n", "got a list"),
        ("just a string\n", "got a single value"),
        (b"\xff\xfe\x00binary", "not a UTF-8 text file"),
        (None, "config file not found"),
        ("folder", "is a folder"),
    ],
    ids=["syntax", "list", "scalar", "binary", "missing", "folder"],
)
def test_unreadable_config_files_give_one_clear_error(tmp_path, content, expected):
    path = tmp_path / "config.yaml"
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.errors) == 1 and expected in info.value.errors[0]
    assert str(path) in str(info.value)


def test_empty_file_reports_the_missing_backbone(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(e.startswith("model.backbone: required key is missing") for e in info.value.errors)


# --- overrides ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, keys, value",
    [
        ("data.batch_size=64", ["data", "batch_size"], 64),
        ("training.lr=0.05", ["training", "lr"], 0.05),
        ("training.lr=1e-3", ["training", "lr"], 0.001),
        ("training.amp=true", ["training", "amp"], True),
        ("training.resume=False", ["training", "resume"], False),
        ("eval.bin_file=null", ["eval", "bin_file"], None),
        ("eval.bin_file=", ["eval", "bin_file"], None),
        ("eval.bin_file=[lfw.bin, cfp_fp.bin]", ["eval", "bin_file"], ["lfw.bin", "cfp_fp.bin"]),
        ("data.root=/data/a=b", ["data", "root"], "/data/a=b"),
        ("model.backbone=resnet50", ["model", "backbone"], "resnet50"),
        ("seed='5'", ["seed"], "5"),
        (" training . lr = 0.5", ["training", "lr"], 0.5),
        ("eval.bin_file=[a, b", ["eval", "bin_file"], "[a, b"),
        ("training.scheduler={name: t-sched, gamma: 0.5}", ["training", "scheduler"], {"name": "t-sched", "gamma": 0.5}),
    ],
)
def test_parse_override_reads_yaml_scalars(text, keys, value):
    parsed_keys, parsed = parse_override(text)
    assert parsed_keys == keys
    assert parsed == value and type(parsed) is type(value)


def test_malformed_overrides_are_all_reported():
    with pytest.raises(ConfigError) as info:
        apply_overrides({"seed": 1}, ["training.lr", "training..lr=1", "=3", "seed.x=1", "data.batch_size=8"])
    errors = info.value.errors
    assert len(errors) == 4, errors
    assert "training.lr" in errors[0] and "key.path=value" in errors[0]
    assert "empty part" in errors[1] and "empty part" in errors[2]
    assert "seed is 1, not a section" in errors[3]


def test_overrides_create_sections_and_leave_the_input_alone():
    original = {"training": {"lr": 0.1}}
    updated = apply_overrides(original, ["training.lr=0.2", "head.margin=0.3"])
    assert updated == {"training": {"lr": 0.2}, "head": {"margin": 0.3}}
    assert original == {"training": {"lr": 0.1}}


def test_overrides_are_validated_like_the_file(slots, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(BASE))
    config = load_config(path, ["training.lr=0.05", "head.margin=0.2", "training.scheduler={name: t-sched, gamma: 0.3}"])
    assert config["training"]["lr"] == 0.05 and config["head"]["margin"] == 0.2
    assert config["training"]["scheduler"] == {"name": "t-sched", "gamma": 0.3}
    with pytest.raises(ConfigError) as info:
        load_config(path, ["training.lr=-1", "traning.lr=0.1", "head.margni=0.1"])
    errors = info.value.errors
    assert any(e.startswith("training.lr: must be > 0, got -1") and "(from --set training.lr=-1)" in e for e in errors)
    assert any(e.startswith("traning: unknown key") and "(from --set traning.lr=0.1)" in e for e in errors)
    assert any(e.startswith("head.margni: unknown key") and 'did you mean "margin"' in e for e in errors)
    assert "--set" in str(info.value).splitlines()[0]


def test_dump_config_round_trips(slots):
    config = validate_config(BASE)
    assert yaml.safe_load(dump_config(config)) == config
    assert validate_config(yaml.safe_load(dump_config(config))) == config


def test_defaults_are_filled_inside_list_entries(tmp_path):
    # the saved config.yaml shows every option a run used, those of data.augment and eval.metrics entries too
    path = tmp_path / "c.yaml"
    path.write_text(SEED_STYLE)
    config = load_config(path, ["data.augment=[flip, {name: random_crop, mode: pad}]",
                                "eval.metrics=[auc, {name: tar_at_far, far_targets: [0.1]}]",
                                "checkpoint.best_metric.key=auc"])
    assert config["data"]["augment"][0] == "flip"  # a bare name stays a name
    crop = config["data"]["augment"][1]
    assert crop == {"name": "random_crop", "mode": "pad", "p": 0.5, "scale": [0.2, 1.0], "ratio": [0.75, 4 / 3]}
    assert config["eval"]["metrics"][1] == {"name": "tar_at_far", "far_targets": [0.1],
                                            "extra_far_targets": [1e-4, 1e-5, 1e-6], "flip": True}
    assert validate_config(yaml_load(dump_config(config))) == config


def test_best_metric_defaults_to_accuracy_and_must_be_produced(tmp_path):
    from facecore.core.build import metric_keys

    path = tmp_path / "c.yaml"
    path.write_text(SEED_STYLE)
    config = load_config(path)
    assert config["checkpoint"]["best_metric"] == {"key": "accuracy", "mode": "max"}
    assert {"accuracy", "best_threshold", "auc", "eer", "tar@far=1e-03"} <= metric_keys(config)
    assert load_config(path, ["checkpoint.best_metric={key: eer, mode: min}"])["checkpoint"]["best_metric"]["mode"] == "min"
    with pytest.raises(ConfigError) as err:
        load_config(path, ["eval.metrics=[auc, eer]", "checkpoint.best_metric.key=acuracy"])
    assert err.value.errors == ["checkpoint.best_metric.key: no eval.metrics entry produces 'acuracy'; they produce "
                                "auc, eer (from --set checkpoint.best_metric.key=acuracy)"]
    with pytest.raises(ConfigError) as err:
        load_config(path, ["checkpoint.best_metric.mode=high"])
    assert "checkpoint.best_metric.mode" in str(err.value)


def test_two_metrics_producing_one_key_is_an_error_naming_both(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(SEED_STYLE)
    with pytest.raises(ConfigError) as err:
        load_config(path, ["eval.metrics=[verification, auc, {name: auc, flip: false}]"])
    assert len(err.value.errors) == 1
    assert err.value.errors[0].startswith("eval.metrics: eval.metrics[1] (auc) and eval.metrics[2] (auc) both "
                                          "produce 'auc'")
