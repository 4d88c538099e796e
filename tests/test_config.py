"""Config loading errors (key + file named), extends/overrides, shipped configs, generated DeepSpeed config."""
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from unimlip_train.config.load import config_from_dict, load_config
from unimlip_train.config.origins import ConfigError
from unimlip_train.config.schema import Config
from unimlip_train.engine.ds_config import build_ds_config
from unimlip_train.models.pretrained import resolve_towers

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"


def _write(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _error(path, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides, resolve=resolve_towers)
    return str(info.value)


def test_unknown_key_names_key_and_file(tmp_path):
    f = _write(tmp_path / "a.yaml", {"train": {"stepz": 3}})
    msg = _error(f)
    assert f in msg and "train.stepz" in msg and "steps" in msg  # the known keys are listed


def test_wrong_type_names_key_and_file(tmp_path):
    f = _write(tmp_path / "a.yaml", {"train": {"steps": "many"}})
    msg = _error(f)
    assert f in msg and "train.steps" in msg and "int" in msg
    f2 = _write(tmp_path / "b.yaml", {"data": "shards/"})
    assert "expected a mapping" in _error(f2) and "'data'" in _error(f2)


def test_extends_merges_and_blames_the_right_file(tmp_path):
    _write(tmp_path / "base.yaml", {"seed": 7, "train": {"steps": 10, "lr": 0.5}})
    child = _write(tmp_path / "child.yaml", {"extends": "base.yaml", "train": {"steps": 20}})
    cfg = load_config(child)
    assert (cfg.seed, cfg.train.steps, cfg.train.lr) == (7, 20, 0.5)
    bad_base = _write(tmp_path / "bad_base.yaml", {"model": {"embed_dimm": 3}})
    child2 = _write(tmp_path / "child2.yaml", {"extends": "bad_base.yaml", "seed": 1})
    msg = _error(child2)
    assert bad_base in msg and "model.embed_dimm" in msg
    cyc_a = tmp_path / "cyc_a.yaml"
    _write(tmp_path / "cyc_b.yaml", {"extends": "cyc_a.yaml"})
    _write(cyc_a, {"extends": "cyc_b.yaml"})
    assert "cycle" in _error(str(cyc_a))
    missing = _write(tmp_path / "m.yaml", {"extends": "nope.yaml"})
    assert "nope.yaml" in _error(missing) and "not found" in _error(missing)


def test_overrides_apply_and_are_blamed_on_the_command_line(tmp_path):
    f = _write(tmp_path / "a.yaml", {"train": {"steps": 10}})
    cfg = load_config(f, ["train.steps=42", "loss.mlm.weight=0", "deepspeed.zero_stage=3", "train.betas=[0.8,0.9]"])
    assert cfg.train.steps == 42 and cfg.loss.mlm.weight == 0.0 and cfg.deepspeed.zero_stage == 3
    assert cfg.train.betas == [0.8, 0.9] and "mlm" not in cfg.loss.enabled()
    msg = _error(f, ["train.steps=lots"])
    assert "command line" in msg and "train.steps" in msg
    assert "key.sub=value" in _error(f, ["train.steps"])
    assert "train.nope" in _error(f, ["train.nope=1"])


@pytest.mark.parametrize("data, key", [
    ({"deepspeed": {"zero_stage": 3}, "train": {"compile": True}}, "train.compile"),
    ({"deepspeed": {"zero_stage": 0, "offload_optimizer": True}}, "deepspeed.offload_optimizer"),
    ({"deepspeed": {"zero_stage": 4}}, "deepspeed.zero_stage"),
    ({"deepspeed": {"precision": "fp8"}}, "deepspeed.precision"),
    ({"data": {"mlm_probability": 0.0}, "loss": {"mlm": {"weight": 1.0}}}, "loss.mlm.weight"),
    ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size"),
    ({"loss": {t: {"weight": 0} for t in ("itc", "itc_feature", "image_ssl", "image_feature", "text_ssl",
                                          "text_feature", "mlm", "itm")}}, "loss"),
    ({"loss": {"positives": "patient"}}, "loss.positives"),
    ({"loss": {"feature_perturbation": "noise"}}, "loss.feature_perturbation"),
    ({"loss": {"itc": {"kind": "hinge"}}}, "loss.itc.kind"),
    ({"loss": {"itc_feature": {"kind": "sigmoid"}}}, "loss.itc_feature.kind"),
    ({"train": {"negatives": "all"}}, "train.negatives"),
    ({"model": {"image": {"token_drop": 1.0}}}, "model.image.token_drop"),
    # a feature-level term whose perturbation is off would silently equal its data-level twin
    ({"model": {"text": {"dropout": 0.0}}}, "loss.itc_feature.weight"),
    ({"model": {"image": {"token_drop": 0.0, "spatial_drop": 0.0}}}, "loss.itc_feature.weight"),
    ({"loss": {"feature_perturbation": "pooled_dropout"}, "model": {"feature_dropout": 0.0}}, "loss.itc_feature.weight"),
    ({"loss": {"feature_noise": "pooled_dropout"}, "model": {"feature_dropout": 0.0}}, "loss.itc_feature.weight"),
    # issue 21's keys
    ({"loss": {"feature_noise": "inside"}}, "loss.feature_noise"),
    ({"loss": {"image_feature_pair": "both"}}, "loss.image_feature_pair"),
    ({"loss": {"text_feature_space": "fusion"}}, "loss.text_feature_space"),
    ({"loss": {"mlm_view": "masked"}}, "loss.mlm_view"),
    ({"loss": {"itm_negatives": "two"}}, "loss.itm_negatives"),
    ({"loss": {"itm_hardness": -0.5}}, "loss.itm_hardness"),
    ({"loss": {"itm_fraction": 0.0}}, "loss.itm_fraction"),
    ({"loss": {"itm_fraction": 1.5}}, "loss.itm_fraction"),
    ({"loss": {"aux_warmup_steps": -1}}, "loss.aux_warmup_steps"),
    ({"loss": {"itc": {"center": True}}}, "loss.itc.center"),
    ({"loss": {"mlm_view": "augmented", "text_ssl": {"weight": 0}}}, "loss.mlm_view"),
    # one sample per process and no accumulation: no negatives at all
    ({"train": {"micro_batch_size": 1}}, "loss.itc.weight"),
    ({"train": {"micro_batch_size": 1, "grad_accum": 4, "negatives": "micro"}}, "loss.itc.weight"),
])
def test_impossible_combinations(tmp_path, data, key):
    f = _write(tmp_path / "bad.yaml", data)
    msg = _error(f)
    assert f"key '{key}'" in msg and f in msg


def test_a_global_contrastive_batch_of_two_is_enough(tmp_path, monkeypatch):
    """Micro batch 1 trains with accumulated negatives (K >= 2), or with several processes."""
    load_config(None, ["train.micro_batch_size=1", "train.grad_accum=2"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    load_config(None, ["train.micro_batch_size=1"])


@pytest.mark.parametrize("override, key, expect", [
    ("train.lr=-1", "train.lr", "(0.0, inf)"),
    ("train.lr=0", "train.lr", "got 0.0"),
    ("train.warmup_steps=-1", "train.warmup_steps", "[0, inf)"),
    ("data.num_workers=-2", "data.num_workers", "got -2"),
    ("data.shuffle_buffer=-1", "data.shuffle_buffer", "got -1"),
    ("train.betas=[0.9,1.0]", "train.betas", "[0, 1)"),
    ("train.betas=[-0.1,0.9]", "train.betas", "[0, 1)"),
    ("train.betas=[0.9]", "train.betas", "two numbers"),
    ("data.max_skip_fraction=1.5", "data.max_skip_fraction", "[0.0, 1.0]"),
    ("model.image.name=nosuchmodel", "model.image.name", "not a timm model"),
    ("model.image.name=resnet10", "model.image.name", "did you mean resnet10t"),
    ("model.image.name=some/folder", "model.image.name", "local-dir:"),
])
def test_out_of_range_values_and_unknown_models_name_the_key_and_its_origin(tmp_path, override, key, expect):
    msg = _error(str(CONFIGS / "tiny_cpu.yaml"), [override])
    assert f"key '{key}'" in msg and "command line" in msg and expect in msg, msg
    name, value = override.split("=", 1)
    section, _, leaf = name.rpartition(".")
    data: dict = {}
    node = data
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(value)
    f = _write(tmp_path / "bad.yaml", data)  # the same value from a file names that file
    msg = _error(f)
    assert f"key '{key}'" in msg and f in msg, msg


@pytest.mark.parametrize("override, expect", [
    ("data.view=lateral", "must be one of ('random', 'frontal', 'pair'), got 'lateral'"),
    ("data.text.order=x", "must be one of ('impression_first', 'findings_first'), got 'x'"),
    ("data.in_chans=2", "must be one of (1, 3), got 2"),
    ("model.projection=cnn", "must be one of ('linear', 'mlp'), got 'cnn'"),
    ("data.text.sections=foo", "must be one of ('findings+impression', 'impression', 'findings', 'random') or a list"),
    ("model.projection=3", "expected str, got int 3"),  # the type is checked before the choice
    ("deepspeed.zero_stage=true", "expected int, got bool True"),  # True == 1, but it is not a ZeRO stage
])
def test_a_bad_choice_names_the_key_its_origin_and_the_choices(override, expect):
    msg = _error(str(CONFIGS / "tiny_cpu.yaml"), [override])
    assert f"command line: key '{override.split('=')[0]}': {expect}" in msg, msg


def test_every_default_is_one_of_its_choices():
    """The schema's Literal types are the only list of each key's choices; its defaults must be among them."""
    def walk(obj, prefix=""):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value, typ = getattr(obj, f.name), hints[f.name]
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{f.name}.")
            choices = [a for a in (typ, *typing.get_args(typ)) if typing.get_origin(a) is typing.Literal]
            if choices:
                yield f"{prefix}{f.name}", value, typing.get_args(choices[0])

    checked = list(walk(Config()))
    assert len(checked) >= 20  # 8 loss terms' kind and a dozen other choices
    for key, value, allowed in checked:
        assert value in allowed, (key, value, allowed)


def test_registry_models_with_a_pretrained_tag_are_accepted():
    cfg = load_config(str(CONFIGS / "tiny_cpu.yaml"), ["model.image.name=vit_tiny_patch16_224.augreg_in21k"],
                      resolve=resolve_towers)
    assert cfg.model.image.name == "vit_tiny_patch16_224.augreg_in21k"


def test_shipped_configs_load_with_the_expected_terms():
    tiny = load_config(str(CONFIGS / "tiny_cpu.yaml"))
    # ITM is off in the tiny config (issue 21: it stayed at its label prior there); all.yaml switches it on.
    assert set(tiny.loss.enabled()) == {"itc", "itc_feature", "image_ssl", "image_feature", "text_ssl",
                                        "text_feature", "mlm"}
    assert (tiny.deepspeed.zero_stage, tiny.deepspeed.precision, tiny.deepspeed.backend) == (1, "fp32", "gloo")
    prod = load_config(str(CONFIGS / "vitb16_biomedbert.yaml"))
    assert (prod.deepspeed.zero_stage, prod.deepspeed.precision, prod.model.image.name) == (
        2, "bf16", "vit_base_patch16_224.augreg2_in21k_ft_in1k")
    assert "BiomedBERT" in prod.model.text.name and prod.train.micro_batch_size == 256
    expected = {"clip_only": {"itc"}, "cross_feature": {"itc", "itc_feature"}, "image_ssl": {"itc", "image_ssl", "image_feature"},
                "text_ssl": {"itc", "text_ssl", "text_feature"}, "fused": {"itc", "mlm", "itm"},
                "all": set(tiny.loss.enabled()) | {"itm"}, "no_itm": set(tiny.loss.enabled()),
                "no_text": set(tiny.loss.enabled()) - {"text_ssl", "text_feature"},
                "encoder_noise": set(tiny.loss.enabled()), "uniformity": set(tiny.loss.enabled()) | {"uniformity"},
                "text_labels": set(tiny.loss.enabled()), "text_labels_ssl": set(tiny.loss.enabled()),
                "no_image": set(tiny.loss.enabled()) - {"image_ssl", "image_feature"},
                "no_fused": set(tiny.loss.enabled()) - {"mlm"}, "aux_warmup": set(tiny.loss.enabled()),
                "aux_double": set(tiny.loss.enabled()), "aux_half": set(tiny.loss.enabled()),
                "mlm_report": set(tiny.loss.enabled()), "itm_two_negatives": set(tiny.loss.enabled()) | {"itm"}}
    assert {p.stem for p in (CONFIGS / "ablations").glob("*.yaml")} == set(expected)
    for name, terms in expected.items():
        assert set(load_config(str(CONFIGS / "ablations" / f"{name}.yaml")).loss.enabled()) == terms, name
    # The weight bracket scales every auxiliary weight of the default, nothing else; ITC keeps 1.
    for name, factor in (("aux_double", 2.0), ("aux_half", 0.5)):
        loss = load_config(str(CONFIGS / "ablations" / f"{name}.yaml")).loss
        assert {t: c.weight for t, c in loss.enabled().items()} == {
            t: c.weight * (1.0 if t == "itc" else factor) for t, c in tiny.loss.enabled().items()}, name
        assert dataclasses.replace(loss, **{t: getattr(tiny.loss, t) for t in loss.enabled()}) == tiny.loss, name
    assert load_config(str(CONFIGS / "ablations" / "aux_warmup.yaml")).loss.aux_warmup_steps == 60
    # The FLOP savings' rows change one key each against the row they are paired with.
    for name, base, key, value in (("mlm_report", tiny.loss, "mlm_view", "report"),
                                   ("itm_two_negatives", load_config(str(CONFIGS / "ablations" / "all.yaml")).loss,
                                    "itm_negatives", "image_and_text")):
        loss = load_config(str(CONFIGS / "ablations" / f"{name}.yaml")).loss
        assert getattr(base, key) != value and loss == dataclasses.replace(base, **{key: value}), name
    # The tiny default's feature noise is the pooled preset (issue 21's protocol); encoder_noise.yaml overrides
    # the preset it inherits, and the production config keeps the schema's encoder-level default.
    encoder = load_config(str(CONFIGS / "ablations" / "encoder_noise.yaml")).loss
    for loss, want in ((tiny.loss, ("pooled_dropout", "two_noised", "shared")),
                       (encoder, ("encoder", "clean_noised", "ssl_head")),
                       (prod.loss, ("encoder", "clean_noised", "ssl_head"))):
        assert (loss.feature_noise, loss.image_feature_pair, loss.text_feature_space) == want


def test_print_config_round_trips_and_cli_config_errors_exit_2(tmp_path):
    cmd = [sys.executable, "-m", "unimlip_train.cli.train", "--config", str(CONFIGS / "tiny_cpu.yaml")]
    out = subprocess.run(cmd + ["--print-config", "train.steps=5"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    resolved = config_from_dict(yaml.safe_load(out.stdout))
    assert resolved == load_config(str(CONFIGS / "tiny_cpu.yaml"), ["train.steps=5"])
    bad = subprocess.run(cmd + ["deepspeed.zero_stage=3", "train.compile=true"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "config error" in bad.stderr and "train.compile" in bad.stderr
    assert "command line" in bad.stderr


def test_overrides_anywhere_on_the_command_line(tmp_path):
    cmd = [sys.executable, "-m", "unimlip_train.cli.train", "train.steps=7", "--config",
           str(CONFIGS / "tiny_cpu.yaml"), "data.num_workers=0", "--run-dir", str(tmp_path / "r"),
           "--print-config", "model.embed_dim=16", "train.steps=9"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = config_from_dict(yaml.safe_load(out.stdout))
    assert (cfg.train.steps, cfg.data.num_workers, cfg.model.embed_dim, cfg.run_dir) == (9, 0, 16, str(tmp_path / "r"))

    from unimlip_train.cli.args import parse_with_overrides
    from unimlip_train.cli.submit import build_parser as submit_parser
    from unimlip_train.cli.train import build_parser as train_parser

    args = parse_with_overrides(submit_parser(), ["train", "--config", "c.yaml", "a.b=1", "--nodes", "2", "c=2",
                                                  "--dry-run", "d=[1, 2]"])
    assert args.overrides == ["a.b=1", "c=2", "d=[1, 2]"] and args.nodes == "2" and args.dry_run
    for parser, argv in ((train_parser(), ["--config", "c.yaml", "a=1", "--confg", "x"]),
                         (train_parser(), ["--config", "c.yaml", "a=1", "--run-dir", "d", "stray"]),
                         (submit_parser(), ["status", "--run-dir", "d", "a=1"])):
        with pytest.raises(SystemExit) as info:
            parse_with_overrides(parser, argv)
        assert info.value.code == 2


@pytest.mark.parametrize("stage, precision, offload", [(0, "fp32", False), (1, "fp32", False), (2, "bf16", True),
                                                       (3, "fp16", True)])
def test_generated_deepspeed_config(stage, precision, offload):
    cfg = load_config(str(CONFIGS / "tiny_cpu.yaml"),
                      [f"deepspeed.zero_stage={stage}", f"deepspeed.precision={precision}",
                       f"deepspeed.offload_optimizer={str(offload).lower()}", "train.grad_accum=3",
                       "train.micro_batch_size=5", "train.clip_grad=0.5"])
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 5 * 3 * 4
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (5, 3)
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"]["enabled"] == (precision == "bf16") and ds["fp16"]["enabled"] == (precision == "fp16")
    assert ("offload_optimizer" in ds["zero_optimization"]) == offload
    fp32_reduction = {"communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"}}
    assert {k: ds.get(k) for k in fp32_reduction} == (fp32_reduction if precision == "bf16" else {
        "communication_data_type": None, "data_types": None})


def test_checkpoint_hash_survives_a_new_config_key(tmp_path):
    """A tag written before a config key existed is the same experiment to this version (ablate's reuse and the
    resume note compare hashes), while a changed value is not."""
    import json

    from unimlip_train.config.load import dump_yaml
    from unimlip_train.engine.checkpoint import STATE_FILE, read_state

    cfg = load_config(None, [])
    old = yaml.safe_load(dump_yaml(cfg))
    del old["loss"]["text_ssl_space"]  # as written before the key was added
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    (tmp_path / STATE_FILE).write_text(json.dumps({"step": 7, "config_hash": "written-by-old-code"}))
    state = read_state(str(tmp_path))
    assert state.step == 7 and state.config_hash == cfg.hash()
    old["loss"]["itc"]["weight"] = 2.0
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert read_state(str(tmp_path)).config_hash != cfg.hash()


def test_feature_perturbation_presets_an_old_run_config_too():
    """A config.yaml written before issue 21 has loss.feature_perturbation and none of the three keys it now
    stands for: reading it back gives the behaviour it was trained with; a new config.yaml names all four."""
    from unimlip_train.config.load import dump_yaml

    new = yaml.safe_load(dump_yaml(load_config(None, ["loss.feature_perturbation=pooled_dropout"])))
    assert new["loss"]["feature_noise"] == "pooled_dropout" and new["loss"]["text_feature_space"] == "shared"
    old = yaml.safe_load(dump_yaml(load_config(None, [])))
    old["loss"]["feature_perturbation"] = "pooled_dropout"
    for key in ("feature_noise", "image_feature_pair", "text_feature_space"):
        del old["loss"][key]
    loss = config_from_dict(old).loss
    assert (loss.feature_noise, loss.image_feature_pair, loss.text_feature_space) == (
        "pooled_dropout", "two_noised", "shared")
    new["loss"]["text_feature_space"] = "ssl_head"  # a resolved config keeps what it names
    assert config_from_dict(new).loss.text_feature_space == "ssl_head"


def test_auxiliary_weights_sum_to_itc_by_default():
    for cfg in (load_config(None, []), load_config(str(CONFIGS / "tiny_cpu.yaml"), []),
                load_config(str(CONFIGS / "vitb16_biomedbert.yaml"), ["model.image.pretrained=", "model.text.name=",
                                                                     "model.text.config={}"])):
        enabled = cfg.loss.enabled()
        assert sum(t.weight for name, t in enabled.items() if name != "itc") <= enabled["itc"].weight + 1e-9
