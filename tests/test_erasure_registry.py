"""Issue 23: methods register themselves, config fields check themselves, trainers name their artifacts."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import safetensors
import torch

from unsee.erasure import (
    METHODS,
    ConfigError,
    ESDConfig,
    ESDTrainer,
    Method,
    SalUnConfig,
    SalUnTrainer,
    Trainer,
    TrainerConfig,
    load_mask,
    make_trainer,
    register_method,
)
from unsee.erasure.ant import ANTConfig, ANTTrainer
from unsee.erasure.fields import NUMBER, declared_kind, setting, setting_limits
from unsee.erasure.sampling import esd_target
from unsee.testing import tiny_sd_pipeline


def test_every_method_is_registered_in_order_with_its_classes():
    assert list(METHODS) == ["esd-x", "esd-u", "esd-all", "esd-x-strict", "salun", "spm", "advunlearn", "ant", "uce",
                            "rece"]
    for name, entry in METHODS.items():
        assert isinstance(entry, Method) and entry.name == name
        assert issubclass(entry.trainer, Trainer) and entry.config is entry.trainer.config_class
        assert issubclass(entry.config, TrainerConfig)
        assert entry.summary and "\n" not in entry.summary
    assert all(METHODS[v].fixed == {"variant": v} and METHODS[v].trainer is ESDTrainer
               for v in ("esd-x", "esd-u", "esd-all", "esd-x-strict"))
    assert METHODS["salun"].fixed == {}


def test_make_trainer_coerces_text_fixes_the_names_fields_and_checks_limits():
    trainer = make_trainer("esd-x", concept="circle", steps="3", lr="1e-4", eta=2, variant="esd-u")
    assert isinstance(trainer, ESDTrainer)
    assert trainer.config.variant == "esd-x"  # the name fixes it
    assert (trainer.config.steps, trainer.config.lr) == (3, 1e-4) and isinstance(trainer.config.steps, int)
    with pytest.raises(ConfigError, match="unknown method 'esd-q'; choose one of esd-x, esd-u"):
        make_trainer("esd-q", concept="circle")
    with pytest.raises(ConfigError, match="spm has no setting 'eta'; its settings are: alpha, anchors"):
        make_trainer("spm", concept="circle", eta=1.0)
    with pytest.raises(ConfigError, match="lr must be a number, got 'fast'"):
        make_trainer("esd-u", concept="circle", lr="fast")
    with pytest.raises(ConfigError, match=r"steps must be from 1 to 100000, got 1000000000000"):
        make_trainer("esd-u", concept="circle", steps=10**12)
    with pytest.raises(ConfigError, match=r"rank must be from 1 to 1024"):
        make_trainer("spm", concept="circle", rank="5000")
    with pytest.raises(ConfigError, match=r"eta must be at most 1e\+06 in size"):
        make_trainer("esd-u", concept="circle", eta=1e7)
    with pytest.raises(ConfigError, match=r"saliency_seeds must be from 0 to 4294967295"):
        make_trainer("ant", concept="circle", saliency_seeds=[1, 2**40])
    with pytest.raises(ConfigError, match="steps must be from 1 to 100000, got a number of more than 30 digits"):
        make_trainer("esd-u", concept="circle", steps=10**40)


def test_a_method_registers_with_one_decorator():
    @dataclass
    class EchoConfig(TrainerConfig):
        strength: float = setting(1.0, NUMBER)
        method: ClassVar[str] = "echo"

    class EchoTrainer(Trainer):
        config_class = EchoConfig

    try:
        assert register_method("test-echo", summary="echo")(EchoTrainer) is EchoTrainer
        assert list(METHODS)[-1] == "test-echo" and METHODS["test-echo"].config is EchoConfig
        trainer = make_trainer("test-echo", concept="circle", strength="2.5")
        assert isinstance(trainer, EchoTrainer) and trainer.config.strength == 2.5
        with pytest.raises(ConfigError, match="strength must be a finite number"):
            make_trainer("test-echo", concept="circle", strength=float("inf"))

        class Other(Trainer):
            config_class = EchoConfig

        with pytest.raises(ValueError, match="registered already"):
            register_method("test-echo", summary="again")(Other)
        with pytest.raises(TypeError, match="lacks"):
            register_method("test-echo-2", summary="x", fixed={"colour": 1})(EchoTrainer)
        with pytest.raises(TypeError, match="Trainer subclass"):
            register_method("test-echo-3", summary="x")(EchoConfig)
    finally:
        for name in ("test-echo", "test-echo-2", "test-echo-3"):
            METHODS.pop(name, None)


def test_every_field_of_every_method_declares_its_kind():
    for entry in METHODS.values():
        for f in dataclasses.fields(entry.config):
            declared_kind(entry.config, f.name)  # raises TypeError for a field declared without one
    # a subclass that only changes a default keeps the kind its base class declared
    with pytest.raises(ConfigError, match="steps must be a positive integer, got 0"):
        SalUnConfig(concept="circle", relabel_prompts=["a"], retain_prompts=["b"], steps=0)
    assert setting_limits(ESDConfig)["steps"] == (1, 100_000) and setting_limits(ESDConfig)["rank"] == (1, 1024)

    @dataclass
    class Undeclared(TrainerConfig):
        colour: str = "red"

    with pytest.raises(TypeError, match="Undeclared.colour is declared without a kind"):
        Undeclared(concept="circle")


@pytest.mark.parametrize("make, message", [
    (lambda: ESDConfig(concept="circle", rank=0), "rank must be a positive integer, got 0"),
    (lambda: ESDConfig(concept="circle", resolution=4), "resolution must be an integer >= 8 or None, got 4"),
    (lambda: ANTConfig(concept="circle", resolution="512"), "resolution must be an integer >= 8 or None"),
    (lambda: ANTConfig(concept="circle", lora_alpha=0), "lora_alpha must be a non-zero number or None, got 0"),
    (lambda: ESDConfig(concept="circle", kind="full"), "kind must be one of delta, lora, got 'full'"),
    (lambda: ANTConfig(concept="circle", kind="full"), "kind must be one of delta, lora, got 'full'"),
    (lambda: ESDConfig(concept="circle", eta=float("nan")), r"eta \(negative guidance\) must be a finite number"),
    (lambda: ESDConfig(concept="circle", lr=0), r"lr \(learning rate\) must be a positive number such as 1e-5"),
    (lambda: ESDConfig(concept="circle", steps=200_000), "steps must be from 1 to 100000, got 200000"),
])
def test_one_check_per_kind_of_field_in_every_method(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_the_esd_target_is_the_negatively_guided_prediction():
    anchor, concept, empty = torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([2.0])
    assert float(esd_target(anchor, concept, empty, 2.0)) == 1.0 - 2.0 * (3.0 - 2.0)
    assert float(esd_target(empty, concept, empty, -1.0)) == 3.0  # a negative eta guides towards the concept


def test_masked_full_weight_trainers_name_their_mask_artifact(tmp_path):
    salun = SalUnConfig(concept="circle", forget_prompts=["a red circle"], relabel_prompts=["a red square"],
                        retain_prompts=["a green star"], num_forget=2, num_retain=2, batch_size=2, generation_steps=2,
                        steps=1, mask_fraction=0.25)
    assert SalUnTrainer.artifact_names(salun) == ("mask",)
    assert ANTTrainer.artifact_names(ANTConfig(concept="circle")) == ("mask",)
    assert ANTTrainer.artifact_names(ANTConfig(concept="circle", kind="lora")) == ()
    assert ESDTrainer.artifact_names(ESDConfig(concept="circle")) == ()
    trainer = SalUnTrainer(salun)
    trainer.train(tiny_sd_pipeline())
    path = tmp_path / "a.mask.safetensors"
    trainer.write_artifact("mask", path, "a.safetensors")
    loaded = load_mask(path)
    assert loaded.keys() == trainer.mask.keys() and all(torch.equal(loaded[k], trainer.mask[k]) for k in loaded)
    with safetensors.safe_open(str(path), "pt") as handle:
        assert json.loads(handle.metadata()["info"]) == {"adapter": "a.safetensors", "mask_fraction": 0.25}
    with pytest.raises(ValueError, match="no artifact 'grid'"):
        trainer.write_artifact("grid", tmp_path / "a.grid.safetensors", "a.safetensors")
