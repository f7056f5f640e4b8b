"""Config: defaults, YAML + include + override precedence, validation messages, DeepSpeed JSON, CLI."""

import json
import textwrap

import pytest
import yaml

from pml_scale.config import (
    Config,
    ConfigError,
    config_from_dict,
    deepspeed_config,
    load_config,
    parse_cli,
    save_resolved,
)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_defaults_match_the_schema():
    cfg = load_config()
    assert cfg == Config()
    assert (cfg.run.name, cfg.run.epochs, cfg.run.resume, cfg.run.log_every) == ("run", 10, True, 10)
    assert (cfg.data.setting, cfg.data.batch_size, cfg.data.image_size, cfg.data.hflip) == ("FAL", 32, 448, 0.5)
    assert (cfg.model.name, cfg.model.dtype, cfg.model.pretrained) == ("resnet50", "bf16", None)
    assert (cfg.loss.name, cfg.loss.options) == ("paper", {})
    assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.lr == 1e-4 and cfg.optim.role_lr_multiplier == 10.0
    assert (cfg.deepspeed.zero_stage, cfg.deepspeed.grad_accum, cfg.deepspeed.extra) == (0, 1, {})
    assert (cfg.pseudo.momentum, cfg.pseudo.sync, cfg.eval.partial) == (0.0, "allgather", None)
    # defaults of two configs never share a mutable dict
    a, b = Config(), Config()
    a.loss.options["q"] = 1
    assert b.loss.options == {}


def test_yaml_include_and_override_precedence(tmp_path):
    write(tmp_path / "base" / "common.yaml", """
        run: {epochs: 3, seed: 7}
        optim: {lr: 1e-2, betas: [0.8, 0.9]}
        loss: {name: paper, options: {q: 0.2, gamma: 0.05}}
        deepspeed: {extra: {zero_optimization: {overlap_comm: true}}}
    """)
    exp = write(tmp_path / "exp" / "coco.yaml", """
        include: ../base/common.yaml
        run: {epochs: 5, name: coco}
        loss: {options: {q: 0.4}}
        model: {name: resnet18, compile: true}
    """)
    cfg = load_config(exp, ["run.epochs=7", "loss.options.m=2", "data.setting=PAL_0.3"])
    assert cfg.run.epochs == 7  # override > file > include > default
    assert cfg.run.name == "coco" and cfg.run.seed == 7  # file, include
    assert cfg.optim.lr == pytest.approx(0.01) and isinstance(cfg.optim.lr, float)  # "1e-2" YAML string
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.loss.options == {"q": 0.4, "gamma": 0.05, "m": 2}  # deep merge across layers
    assert cfg.model.compile is True and cfg.model.name == "resnet18"
    assert cfg.deepspeed.extra == {"zero_optimization": {"overlap_comm": True}}
    assert cfg.data.setting == "PAL_0.3" and cfg.optim.weight_decay == 1e-4  # untouched default


def test_override_values_are_yaml_typed():
    cfg = load_config(None, ["loss.q=0.3", "model.compile=true", "loss.options.name_x=abc",
                             "optim.betas=[0.5, 0.6]", "data.observed=null", "model.pretrained=/w/r50.pth",
                             "eval.partial=false", "deepspeed.extra={a: {b: 1}}"])
    assert cfg.loss.options == {"q": 0.3, "name_x": "abc"}  # loss.<k> is loss.options.<k>
    assert isinstance(cfg.loss.options["q"], float)
    assert cfg.model.compile is True and cfg.eval.partial is False
    assert cfg.optim.betas == (0.5, 0.6) and cfg.data.observed is None
    assert cfg.model.pretrained == "/w/r50.pth"
    assert cfg.deepspeed.extra == {"a": {"b": 1}}
    # an override of a whole dict replaces it (a file layer merges)
    assert load_config(None, ["loss.options.q=1", "loss.options={p: 2}"]).loss.options == {"p": 2}


def test_unknown_keys_name_the_path_and_the_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["run.epoch=3"])
    msg = str(e.value)
    assert "run.epoch" in msg and "did you mean 'run.epochs'" in msg.lower()
    for key in ("name", "out_dir", "seed", "epochs", "resume", "log_every", "eval_every", "deterministic"):
        assert key in msg
    bad = write(tmp_path / "bad.yaml", "optim:\n  lr: 0.1\n  lr_decay: 0.5\n")
    with pytest.raises(ConfigError, match=r"optim\.lr_decay.*bad\.yaml.*schedule"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"unknown key 'trainer'.*run, data, model, loss, optim"):
        load_config(None, ["trainer.x=1"])
    with pytest.raises(ConfigError, match="no key 'x'"):
        load_config(None, ["run.epochs.x=1"])


@pytest.mark.parametrize("override, words", [
    ("run.epochs=abc", ["run.epochs", "int", "'abc'"]),
    ("run.epochs=2.5", ["run.epochs", "int", "2.5"]),
    ("model.compile=maybe", ["model.compile", "bool", "maybe"]),
    ("optim.lr=fast", ["optim.lr", "float", "fast"]),
    ("optim.betas=0.9", ["optim.betas", "list of 2 float"]),
    ("model.dtype=f16", ["model.dtype", "bf16, fp16, fp32"]),
    ("optim.schedule=step", ["optim.schedule", "cosine, onecycle, constant"]),
    ("data.setting=PAL_3", ["data.setting", "PAL_r"]),
    ("data.setting=HALF", ["data.setting", "FAL"]),
    ("run.epochs=0", ["run.epochs", "out of range"]),
    ("data.hflip=1.5", ["data.hflip", "out of range"]),
    ("deepspeed.zero_stage=4", ["deepspeed.zero_stage", "out of range"]),
    ("loss.options=3", ["loss.options", "mapping"]),
    ("runepochs", ["section.key=value"]),
])
def test_bad_values_name_key_type_and_value(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match="not found.*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    broken = write(tmp_path / "broken.yaml", "run:\n  epochs: 3\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml line [34]"):
        load_config(broken)
    write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(write(tmp_path / "c.yaml", "defaults: [missing.yaml]\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path / "d.yaml", "- 1\n- 2\n"))


def test_save_resolved_round_trips(tmp_path):
    cfg = load_config(None, ["run.name=x", "optim.betas=[0.85,0.95]", "loss.options={q: 0.3, m: 3}",
                             "data.setting=PPL_0.6", "deepspeed.extra={zero_optimization: {overlap_comm: true}}"])
    path = tmp_path / "resolved.yaml"
    save_resolved(cfg, path)
    assert load_config(path) == cfg
    assert config_from_dict(yaml.safe_load(path.read_text())) == cfg
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temp file


def test_deepspeed_config_has_no_optimizer_and_right_batch(tmp_path):
    cfg = load_config(None, ["data.batch_size=24", "deepspeed.grad_accum=3", "deepspeed.grad_clip=1.5",
                             "deepspeed.zero_stage=2"])
    ds = deepspeed_config(cfg, world_size=4)
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ds["train_micro_batch_size_per_gpu"] == 24
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 * 3 * 4
    assert ds["gradient_clipping"] == 1.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["zero_optimization"]["stage"] == 2 and ds["steps_per_print"] >= 10**6
    fp16 = deepspeed_config(load_config(None, ["model.dtype=fp16"]), world_size=1)
    assert fp16["fp16"]["enabled"] and not fp16["bf16"]["enabled"]
    fp32 = deepspeed_config(load_config(None, ["model.dtype=fp32"]), world_size=1)
    assert not fp32["fp16"]["enabled"] and not fp32["bf16"]["enabled"]


def test_deepspeed_json_file_and_extra_merge_order(tmp_path):
    js = tmp_path / "ds.json"
    js.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True},
                              "gradient_clipping": 9.0, "communication_data_type": "fp32"}))
    cfg = load_config(None, [f"deepspeed.config={js}", "deepspeed.grad_clip=2.0",
                             "deepspeed.extra={zero_optimization: {reduce_bucket_size: 1000}, wall_clock_breakdown: true}"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"] == {"stage": 0, "overlap_comm": True, "reduce_bucket_size": 1000}
    assert ds["gradient_clipping"] == 2.0  # generated keys win over the file
    assert ds["communication_data_type"] == "fp32"  # file keys kept
    assert ds["wall_clock_breakdown"] is True  # extra wins over everything
    js.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="optimizer.*ds.json"):
        deepspeed_config(cfg, world_size=2)
    with pytest.raises(ConfigError, match="scheduler.*deepspeed.extra"):
        deepspeed_config(load_config(None, ["deepspeed.extra={scheduler: {type: WarmupLR}}"]), world_size=1)
    with pytest.raises(ConfigError, match="data.batch_size"):
        deepspeed_config(load_config(None, ["deepspeed.extra={train_micro_batch_size_per_gpu: 3}"]), world_size=1)
    with pytest.raises(ConfigError, match="not found"):
        deepspeed_config(load_config(None, [f"deepspeed.config={tmp_path / 'no.json'}"]), world_size=1)
    with pytest.raises(ConfigError, match="world_size"):
        deepspeed_config(Config(), world_size=0)


def test_parse_cli_accepts_deepspeed_local_rank():
    assert parse_cli(["--local_rank=3", "--config", "c.yaml", "run.epochs=2", "loss.q=0.3"]) == (
        "c.yaml", ["run.epochs=2", "loss.q=0.3"])
    assert parse_cli(["run.name=a", "--config=x.yaml", "--local-rank", "0"]) == ("x.yaml", ["run.name=a"])
    assert parse_cli([]) == (None, [])
    with pytest.raises(ConfigError, match="unknown option '--epochs'"):
        parse_cli(["--epochs", "3"])
    with pytest.raises(ConfigError, match="not an override"):
        parse_cli(["--config", "c.yaml", "stray"])
