"""Every option of every group composes against its schema; bad values fail before any tensor exists."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ValidationError

from mprun.config import validate
from mprun.errors import ConfigError

CONF = Path(__file__).resolve().parent.parent / "conf"
# Options that need a value only the user can give.
REQUIRED = {
    ("model", "timm"): ["model.name=resnet18"],
    ("model", "torchvision"): ["model.name=resnet18"],
    ("dataset", "imagefolder"): ["dataset.root=/nonexistent"],
    ("dataset", "textfile"): ["dataset.path=/nonexistent.txt"],
    ("dataset", "textfolder"): ["dataset.root=/nonexistent"],
}
OPTIONS = [
    (group.name, option.stem)
    for group in sorted(CONF.iterdir())
    if group.is_dir()
    for option in sorted(group.glob("*.yaml"))
]


def test_every_group_has_options() -> None:
    groups = {g for g, _ in OPTIONS}
    assert {"model", "dataset", "optimizer", "scheduler", "precision", "trainer", "tracking", "paths"} <= groups
    precisions = {o for g, o in OPTIONS if g == "precision"}
    assert precisions == {"auto", "fp32", "tf32", "fp16", "fp16_static", "fp16_unscaled", "bf16", "bf16_pure", "fp8"}
    models = {o for g, o in OPTIONS if g == "model"}
    assert {"simple_mlp", "simple_cnn", "resnet18", "resnet50", "vit_b16", "timm", "torchvision"} <= models


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_validates(make_cfg, group: str, option: str) -> None:
    cfg = make_cfg(f"{group}={option}", *REQUIRED.get((group, option), []))
    checked = validate(cfg)
    assert all(getattr(checked, g) is not None for g in ("model", "dataset", "optimizer", "scheduler", "precision"))


def test_defaults() -> None:
    from hydra import compose, initialize_config_dir

    from mprun.cli import CONFIG_DIR, PRIMARY

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):  # not make_cfg: it pins precision=fp32
        cfg = compose(PRIMARY)
    assert cfg.precision.dtype.name == "auto"
    assert cfg.dataset._target_ == "mprun.data.images.digits"
    assert cfg.model._target_ == "mprun.models.vision.SimpleCNN"


@pytest.mark.parametrize("override", ["precision=fp17", "model=resnet5000", "dataset=imagenet22k"])
def test_unknown_option_fails_at_compose(make_cfg, override: str) -> None:
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg(override)
    assert "Could not find" in str(e.value)


@pytest.mark.parametrize("override", ["trainer.max_epochs=abc", "optimizer.lr=fast", "precision.dtype=fp64"])
def test_wrong_type_fails_at_compose(make_cfg, override: str) -> None:
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg(override)
    assert isinstance(e.value.__cause__, ValidationError)


def test_unknown_key_fails_at_compose(make_cfg) -> None:
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg("trainer.epochs=3")
    assert isinstance(e.value.__cause__, ConfigAttributeError)
    assert "not in 'TrainerConfig'" in str(e.value.__cause__)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["+trainer.max_epoch=3"], "trainer.max_epoch: unknown key; did you mean trainer.max_epochs? trainer takes "),
        (["+seed=1"], "seed: unknown key; the config takes dataset, model, "),
        (
            ["model=simple_mlp", "+model.kwargs.bias=false"],
            "model.kwargs: unknown key; model takes depth, grad_scale, hidden",
        ),
    ],
)
def test_a_key_added_with_plus_that_no_schema_has_is_an_error(make_cfg, overrides: list[str], message: str) -> None:
    """`+key=value` adds a key the schema lacks, and converting to the dataclass dropped it silently (a typo'd
    +trainer.max_epoch=3 trained the default 10 epochs; +model.kwargs on simple_mlp ended in a TypeError)."""
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*overrides))
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["optimizer.lr=-1"], "optimizer.lr"),
        (["optimizer.lr=0"], "optimizer.lr"),
        (["trainer.grad_accum_steps=0"], "trainer.grad_accum_steps"),
        (["trainer.max_epochs=0"], "trainer.max_epochs"),
        (["precision=fp16", "precision.init_scale=0"], "precision.init_scale"),
        (["precision=fp16_static", "precision.init_scale=-128"], "precision.init_scale"),
        (["precision=fp16", "precision.backoff_factor=1.5"], "precision.backoff_factor"),
        (["precision=fp16", "precision.growth_factor=1.0"], "precision.growth_factor"),
        (["precision.grad_clip_norm=1", "precision.grad_clip_value=1"], "precision.grad_clip_norm"),
        (["precision=bf16", "precision.loss_scale=dynamic"], "precision.loss_scale"),
        (["optimizer=sgd", "optimizer.momentum=1.5"], "optimizer.momentum"),
        (["dataset.batch_size=0"], "dataset.batch_size"),
        (["dataset.val_fraction=1.0"], "dataset.val_fraction"),
        (["scheduler=step", "scheduler.gamma=0"], "scheduler.gamma"),
        (["scheduler=onecycle", "scheduler.div_factor=0"], "scheduler.div_factor"),  # was a ZeroDivisionError
        (["scheduler=onecycle", "scheduler.final_div_factor=-1"], "scheduler.final_div_factor"),  # trained at lr < 0
    ],
)
def test_out_of_range_names_the_key(make_cfg, overrides: list[str], key: str) -> None:
    cfg = make_cfg(*overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value).startswith(key), str(e.value)


def test_fp16_scaling_can_be_switched_off_with_one_override(make_cfg) -> None:
    checked = validate(make_cfg("precision=fp16", "precision.loss_scale=none"))
    assert checked.precision.loss_scale.value == "none"


def test_fp16_static_is_a_delta_over_fp16(make_cfg) -> None:
    p = validate(make_cfg("precision=fp16_static")).precision
    assert (p.dtype.value, p.loss_scale.value, p.init_scale) == ("fp16", "static", 128.0)


SCHEMA_OPTIONS = [(g, o) for g, o in OPTIONS if g not in ("experiment", "hydra")]


@pytest.mark.parametrize("group,option", SCHEMA_OPTIONS, ids=[f"{g}={o}" for g, o in SCHEMA_OPTIONS])
def test_an_option_states_only_what_differs_from_what_it_extends(group: str, option: str) -> None:
    """One home per default: the schema dataclass states it, and an option's YAML only what makes it that option.
    (AdamW's lr was 1e-3 in the schema and 3e-3 in its YAML; SGD's weight_decay 0 and 5e-4.)"""
    import yaml
    from omegaconf import OmegaConf

    from mprun.config import SCHEMAS

    body = yaml.safe_load((CONF / group / f"{option}.yaml").read_text()) or {}
    (base,) = [d for d in body.pop("defaults") if d != "_self_"]
    if base.startswith("/"):  # a schema: its dataclass defaults
        extended = OmegaConf.structured(SCHEMAS[base[1:].split("@")[0]])
    else:  # another option of the group: what it composes to
        from hydra import compose, initialize_config_dir

        from mprun.cli import CONFIG_DIR, PRIMARY

        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            extended = compose(PRIMARY, overrides=[f"{group}={base}"])[group]
    restated = [
        k
        for k, v in body.items()
        if not OmegaConf.is_missing(extended, k)
        and OmegaConf.to_container(OmegaConf.create({"v": extended[k]}), enum_to_str=True)["v"] == v
    ]
    assert not restated, f"conf/{group}/{option}.yaml restates {restated}: the schema (or {base}) already says so"


def test_the_schema_defaults_are_the_values_runs_get(make_cfg) -> None:
    """The drifted defaults were settled on what every run composed from conf/ already got."""
    from mprun.optim.config import AdamWConfig, SGDConfig

    assert AdamWConfig().lr == make_cfg().optimizer.lr == 3e-3
    assert SGDConfig().weight_decay == make_cfg("optimizer=sgd").optimizer.weight_decay == 5e-4
