"""Config: defaults, YAML + include + override precedence, validation messages, DeepSpeed JSON, CLI."""

import json
import textwrap

import pytest
import yaml

from pml_scale.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    parse_cli,
    save_resolved,
)
from pml_scale.deepspeed_config import deepspeed_config


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


# ----------------------------------------------------------------------------- every error path
# One case per way a config can be wrong today: the message names the key, where the value came
# from (file or override) and what is accepted. Written against the hand-made validator and kept
# unchanged when the schema moved onto pydantic.


def error_of(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


@pytest.mark.parametrize("override, words", [
    # unknown key, at each level, with a close-match hint and the valid keys
    ("optm.lr=0.1", ["unknown key 'optm'", "override 'optm.lr=0.1'", "Did you mean 'optim'?",
                     "run, data, model, loss, optim, deepspeed, pseudo, eval"]),
    ("zzzz=1", ["unknown key 'zzzz'", "Valid sections of the config: run"]),
    ("model.dtpye=fp16", ["unknown key 'model.dtpye'", "Did you mean 'model.dtype'?", "channels_last"]),
    ("run.qqqqqq=1", ["unknown key 'run.qqqqqq'", "Valid keys of 'run'"]),
    ("run.epochs.x=1", ["run.epochs", "no key 'x'", "override 'run.epochs.x=1'"]),
    ("optim.betas.0=0.5", ["optim.betas", "no key '0'"]),
    # wrong type, each kind of field
    ("run.epochs=true", ["run.epochs", "expected int", "True", "override 'run.epochs=true'"]),
    ("run.epochs='3'", ["run.epochs", "expected int", "'3'"]),
    ("run.epochs=", ["run.epochs", "expected int", "None"]),
    ("optim.lr=true", ["optim.lr", "expected float", "True"]),
    ("optim.lr=[1]", ["optim.lr", "expected float", "[1]"]),
    ("run.name=[a]", ["run.name", "expected str", "['a']"]),
    ("run.name=true", ["run.name", "expected str", "True"]),
    ("run.name=", ["run.name", "expected str", "None"]),
    ("model.compile=1", ["model.compile", "expected bool", "use true or false"]),
    ("eval.partial=2", ["eval.partial", "bool", "2"]),
    ("model.pretrained=[a]", ["model.pretrained", "str", "['a']"]),
    ("optim.betas=[0.9, 0.99, 0.999]", ["optim.betas", "list of 2 float", "0.999"]),
    ("optim.betas=[0.9, x]", ["optim.betas", "float", "'x'"]),
    ("optim.betas={a: 1}", ["optim.betas", "'a'"]),
    ("deepspeed.extra=[1, 2]", ["deepspeed.extra", "mapping", "[1, 2]"]),
    ("loss.options=", ["loss.options", "mapping", "None"]),
    ("run=3", ["'run' is a section", "mapping", "3", "override 'run=3'"]),
    # out of range: lower bound, closed and open upper bound, NaN
    ("run.epochs=0", ["run.epochs", "0", "out of range [1, inf]", "override 'run.epochs=0'"]),
    ("run.eval_every=-1", ["run.eval_every", "out of range [0, inf]"]),
    ("data.hflip=1.5", ["data.hflip", "1.5", "out of range [0.0, 1.0]"]),
    ("data.hflip=-0.1", ["data.hflip", "out of range [0.0, 1.0]"]),
    ("model.head_dropout=1.0", ["model.head_dropout", "out of range [0.0, 1.0)"]),
    ("pseudo.momentum=1", ["pseudo.momentum", "out of range [0.0, 1.0)"]),
    ("optim.lr=.nan", ["optim.lr", "nan", "out of range"]),
    ("deepspeed.zero_stage=4", ["deepspeed.zero_stage", "out of range [0, 3]"]),
    # a choice not accepted
    ("optim.name=adam", ["optim.name", "'adam'", "adamw, sgd", "override 'optim.name=adam'"]),
    ("pseudo.sync=ring", ["pseudo.sync", "allgather, affinity"]),
    ("model.dtype=16", ["model.dtype", "16", "bf16, fp16, fp32"]),
    ("data.setting=PAL_0", ["data.setting", "'PAL_0'", "0 < r <= 1"]),
    ("data.setting=PPL_1.5", ["data.setting", "PPL_r"]),
    ("data.setting=pal_0.3", ["data.setting", "FAL, SPL, NATIVE"]),
    ("data.setting=PAL", ["data.setting", "PAL_r"]),
    # the override syntax
    ("run.epochs", ["run.epochs", "section.key=value"]),
    ("=3", ["bad key", "section.key=value"]),
    ("run..epochs=3", ["bad key 'run..epochs'"]),
    (".epochs=3", ["bad key '.epochs'"]),
])
def test_each_error_names_key_origin_and_accepted(override, words):
    msg = error_of(overrides=[override])
    for w in words:
        assert w in msg, (w, msg)
    assert msg.count("\n") == 0  # one error, one line


def test_override_value_must_be_yaml():
    msg = error_of(overrides=["run.epochs=[1"])
    assert "override 'run.epochs=[1'" in msg and "not valid YAML" in msg


def test_no_hint_when_nothing_is_close():
    assert "Did you mean" not in error_of(overrides=["run.qqqqqq=1"])
    assert "Did you mean" not in error_of(overrides=["zzzz=1"])


@pytest.mark.parametrize("override, check", [
    ("run.epochs=3.0", lambda c: c.run.epochs == 3 and type(c.run.epochs) is int),
    ("optim.lr=2", lambda c: c.optim.lr == 2.0 and type(c.optim.lr) is float),
    ("optim.lr='1e-3'", lambda c: c.optim.lr == 1e-3),
    ("optim.betas=['0.5', 1]", lambda c: c.optim.betas == (0.5, 1.0)),
    ("run.name=123", lambda c: c.run.name == "123"),
    ("model.pretrained=7", lambda c: c.model.pretrained == "7"),
    ("model.pretrained=None", lambda c: c.model.pretrained is None),
    ("eval.partial=null", lambda c: c.eval.partial is None),
    ("eval.partial=yes", lambda c: c.eval.partial is True),  # YAML 1.1 booleans
    ("data.hflip=1", lambda c: c.data.hflip == 1.0),  # closed upper bound
    ("pseudo.momentum=0.999", lambda c: c.pseudo.momentum == 0.999),
    ("run.eval_every=0", lambda c: c.run.eval_every == 0),
    ("deepspeed.zero_stage=3", lambda c: c.deepspeed.zero_stage == 3),
    ("data.setting=PAL_1", lambda c: c.data.setting == "PAL_1"),
    ("data.setting=PPL_.5", lambda c: c.data.setting == "PPL_.5"),
    ("data.setting=NATIVE", lambda c: c.data.setting == "NATIVE"),
    ("loss.options.a.b=1", lambda c: c.loss.options == {"a": {"b": 1}}),
    ("deepspeed.extra.zero_optimization.stage=3", lambda c: c.deepspeed.extra == {"zero_optimization": {"stage": 3}}),
    ("run={epochs: 4}", lambda c: c.run.epochs == 4 and c.run.name == "run"),
    ("loss={q: 0.1, name: an}", lambda c: c.loss.options == {"q": 0.1} and c.loss.name == "an"),
    ("run.name=a=b", lambda c: c.run.name == "a=b"),
])
def test_values_yaml_gives_are_accepted(override, check):
    assert check(load_config(None, [override]))


def test_file_errors_name_the_file_the_value_came_from(tmp_path):
    inc = write(tmp_path / "base" / "inc.yaml", "optim: {lr: fast}\nrun: {epochs: 0}\n")
    top = write(tmp_path / "top.yaml", "include: base/inc.yaml\nrun: {epochs: 2}\n")
    msg = error_of(top)  # the bad lr came from the included file, not the including one
    assert "optim.lr" in msg and "expected float" in msg and f"file {inc.resolve()}" in msg
    assert "run.epochs" not in msg  # the top file replaced the included 0
    assert load_config(top, ["optim.lr=0.5"]).optim.lr == 0.5  # only the final value is checked
    msg = error_of(write(tmp_path / "unk.yaml", "optm:\n  lr: 0.1\n"))
    assert "unknown key 'optm'" in msg and "unk.yaml" in msg and "Did you mean 'optim'?" in msg
    msg = error_of(write(tmp_path / "sec.yaml", "run: 3\n"))
    assert "'run' is a section" in msg and "sec.yaml" in msg
    msg = error_of(write(tmp_path / "rng.yaml", "data: {hflip: 2}\n"))
    assert "data.hflip" in msg and "out of range" in msg and "rng.yaml" in msg
    msg = error_of(write(tmp_path / "ch.yaml", "optim: {schedule: step}\n"))
    assert "optim.schedule" in msg and "cosine, onecycle, constant" in msg and "ch.yaml" in msg
    msg = error_of(write(tmp_path / "emp.yaml", "run: {'': 1}\n"))
    assert "empty key" in msg and "emp.yaml" in msg
    msg = error_of(write(tmp_path / "plain.yaml", "optim: {betas: {a: 1}}\n"))
    assert "optim.betas" in msg and "plain.yaml" in msg
    cfg = load_config(write(tmp_path / "lossq.yaml", "loss: {name: an, q: 0.2, options: {m: 1}}\n"), ["loss.k=x"])
    assert cfg.loss.name == "an" and cfg.loss.options == {"q": 0.2, "m": 1, "k": "x"}  # loss.<k> shorthand
    assert load_config(write(tmp_path / "nul.yaml", "run:\neval: null\n")) == Config()  # empty sections


def test_include_errors_and_order(tmp_path):
    write(tmp_path / "a.yaml", "run: {epochs: 2, name: a}\n")
    write(tmp_path / "b.yaml", "run: {epochs: 3}\n")
    cfg = load_config(write(tmp_path / "top.yaml", "defaults: [a.yaml, b.yaml]\nrun: {seed: 5}\n"))
    assert (cfg.run.epochs, cfg.run.name, cfg.run.seed) == (3, "a", 5)  # later include wins, file wins over both
    msg = error_of(write(tmp_path / "bad_inc.yaml", "include: 3\n"))
    assert "bad_inc.yaml" in msg and "'include' must be a file name or a list of file names" in msg
    msg = error_of(write(tmp_path / "bad_inc2.yaml", "include: [a.yaml, {x: 1}]\n"))
    assert "bad_inc2.yaml" in msg and "list of file names" in msg
    msg = error_of(write(tmp_path / "self.yaml", "include: self.yaml\n"))
    assert "include cycle" in msg and "self.yaml -> " in msg
    write(tmp_path / "sub" / "inner.yaml", "include: ../missing.yaml\n")
    msg = error_of(write(tmp_path / "outer.yaml", "include: sub/inner.yaml\n"))
    assert "config file not found" in msg and "missing.yaml" in msg
    msg = error_of(tmp_path)  # a folder, not a file
    assert "cannot read config file" in msg and str(tmp_path) in msg
    assert load_config(write(tmp_path / "empty.yaml", "")) == Config()
    with pytest.raises(ConfigError, match="must be a mapping"):
        config_from_dict([1, 2])
    with pytest.raises(ConfigError, match=r"unknown key 'run.epoch' \(from saved run\)"):
        config_from_dict({"run": {"epoch": 1}}, origin="saved run")


def test_every_bad_value_is_reported_at_once(tmp_path):
    bad = write(tmp_path / "bad.yaml", "run: {epochs: 0}\noptim: {lr: fast, schedule: step}\n")
    lines = error_of(bad, ["model.dtype=f16"]).splitlines()
    assert len(lines) == 4, lines
    assert [l.split(":")[0] for l in lines] == ["run.epochs", "model.dtype", "optim.lr", "optim.schedule"]
    assert "override 'model.dtype=f16'" in lines[1] and all("bad.yaml" in l for l in (lines[0], *lines[2:]))
