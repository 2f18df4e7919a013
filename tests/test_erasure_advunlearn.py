"""AdvUnlearn: adversarial unlearning of the text encoder (tiny SD pipeline)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from unsee.adapters import load_adapter
from unsee.erasure import AdvUnlearnConfig, AdvUnlearnTrainer, ConfigError, TrainingError, encoder_layer_parameters
from unsee.erasure import prefix_embedding
from unsee.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

FAST = dict(concept="circle", ddim_steps=2, attack_steps=4, retain_batch=2, lr=1e-3, checkpoint_every=0,
            retain_prompts=("a blue square", "a green star", "a red heart"))


@pytest.fixture
def pipe():
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_unet_and_token_embeddings_stay_bit_identical(pipe):
    unet_before, te_before = _state(pipe.unet), _state(pipe.text_encoder)
    embeddings_before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    norm = next(k for k in te_before if k.endswith("final_layer_norm.weight"))
    trainer = AdvUnlearnTrainer(AdvUnlearnConfig(steps=3, warmup=1, **FAST))
    adapter = trainer.train(pipe)
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet_before.items())
    assert all(torch.equal(v, pipe.text_encoder.state_dict()[k]) for k, v in te_before.items())  # restored
    assert adapter.kind == "text_encoder" and adapter.components == ["text_encoder"]
    assert not any("embeddings" in key for key in adapter.tensors)
    assert any(float(t.abs().max()) > 0 for t in adapter.tensors.values())  # training changed the encoder

    name = pipe.load_erasure(adapter)
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet_before.items())
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, embeddings_before)
    assert not torch.equal(pipe.text_encoder.state_dict()[norm], te_before[norm])
    pipe.unload_erasure(name)
    assert all(torch.equal(v, pipe.text_encoder.state_dict()[k]) for k, v in te_before.items())


def test_retain_loss_is_zero_at_initialisation(pipe):
    trainer = AdvUnlearnTrainer(AdvUnlearnConfig(steps=1, warmup=0, **FAST))
    trainer.train(pipe)
    assert trainer.last_terms["retain"] == 0.0
    assert trainer.last_terms["erase"] > 0


def test_attack_loss_decreases_over_its_steps(pipe):
    config = AdvUnlearnConfig(steps=1, warmup=0, **{**FAST, "attack_steps": 15, "attack_lr": 5e-2})
    trainer = AdvUnlearnTrainer(config)
    trainer.train(pipe)
    losses = trainer.last_attack_losses
    assert len(losses) == 15
    assert losses[-1] < losses[0]


def test_in_context_erase_term_anchors_at_the_drawn_prompt(pipe):
    # eta 0, first step before the attack: the in-context target is c_from's own original prediction, which the
    # untouched encoder reproduces; the paper's target (anchored at "") leaves a positive erase term
    froms = ("a red circle", "a blue circle")
    in_context = AdvUnlearnTrainer(AdvUnlearnConfig(steps=1, warmup=1, eta=0.0, erase_from=froms, **FAST))
    in_context.train(pipe)
    assert in_context.last_terms["erase"] < 1e-12
    bare = AdvUnlearnTrainer(AdvUnlearnConfig(steps=1, warmup=1, eta=0.0, **FAST))
    bare.train(pipe)
    assert bare.last_terms["erase"] > 1e-6
    attacked = AdvUnlearnTrainer(AdvUnlearnConfig(steps=1, warmup=0, erase_from=froms, **FAST))
    attacked.train(pipe)  # the prefix goes before the drawn c_from
    assert len(attacked.last_attack_losses) == FAST["attack_steps"]


def test_warmup_steps_train_without_the_attack(pipe):
    trainer = AdvUnlearnTrainer(AdvUnlearnConfig(steps=2, warmup=2, **FAST))
    adapter = trainer.train(pipe)
    assert trainer.last_attack_losses == []
    assert adapter.training["last_attack_loss_first"] is None


def test_layers_are_selected_by_exact_index():
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=12,
                                           num_attention_heads=2, max_position_embeddings=16))
    names = list(encoder_layer_parameters(encoder, (1,)))
    assert names and all("layers.1." in n and "layers.1" + "0" not in n for n in names)  # never layers.10 or 11
    assert len(names) == len(list(encoder.encoder.layers[1].parameters()))
    every = encoder_layer_parameters(encoder)
    assert any(n.endswith("final_layer_norm.weight") for n in every)
    assert not any("embeddings" in n for n in every)
    with pytest.raises(ConfigError, match="encoder layer 12"):
        encoder_layer_parameters(encoder, (12,))


def test_adapter_file_plugs_into_another_pipeline_with_the_same_text_encoder(pipe, tmp_path):
    adapter = AdvUnlearnTrainer(AdvUnlearnConfig(steps=1, warmup=0, **FAST)).train(pipe)
    path = adapter.save(tmp_path / "advunlearn-circle.safetensors")
    other = tiny_sd_pipeline(seed=1)  # same architecture, other weights
    other.set_progress_bar_config(disable=True)
    unet_before = _state(other.unet)
    other.load_erasure(path)
    assert load_adapter(path).kind == "text_encoder"
    assert all(torch.equal(v, other.unet.state_dict()[k]) for k, v in unet_before.items())


def test_prefix_embedding_replaces_the_token_after_the_start_token(pipe):
    encoder = pipe.text_encoder
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    delta = torch.randn(1, encoder.config.hidden_size)
    captured = []
    hook = encoder.get_input_embeddings().register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        with prefix_embedding(encoder, delta):
            encoder(ids)
        encoder(ids)
    finally:
        hook.remove()
    # the capturing hook runs first and sees the plain embeddings; compare the encoder outputs instead
    with torch.no_grad(), prefix_embedding(encoder, delta):
        adversarial = encoder(ids)[0]
    plain = encoder(ids)[0]
    assert not torch.equal(adversarial[:, 1], plain[:, 1])
    assert torch.equal(adversarial[:, 0], plain[:, 0])  # causal attention: the start token cannot see the prefix


def test_sdxl_is_refused_with_a_clear_message():
    pipe = tiny_sdxl_pipeline()
    with pytest.raises(TrainingError, match="SD 1.x/2.x text encoder"):
        AdvUnlearnTrainer(AdvUnlearnConfig(steps=1, **FAST)).train(pipe)


@pytest.mark.parametrize("field,value,message", [
    ("attack_steps", 0, "attack_steps must be a positive integer"),
    ("prefix_tokens", 0, "prefix_tokens must be a positive integer"),
    ("attack_lr", 0.0, "attack_lr must be a positive number"),
    ("attack_init", "zeros", "attack_init must be one of"),
    ("layers", (-1,), "layers must be encoder layer indices"),
    ("retain_prompts", (), "retain_prompts is empty"),
    ("warmup", -1, "warmup must be a non-negative integer"),
    ("erase_from", ["a circle", ""], "erase_from must be a non-empty text"),
])
def test_invalid_config_fails_on_construction(field, value, message):
    with pytest.raises(ConfigError, match=message):
        AdvUnlearnConfig(concept="circle", **{field: value})


def test_erase_job_with_method_advunlearn(pipe, tmp_path):
    from unsee.jobs import run_jobs

    out = tmp_path / "advunlearn-circle.safetensors"
    # preset paper: the tiny pipeline is not the toy model, and the toy preset's world prompts are for the toy model
    report = run_jobs({"method": "advunlearn", "concept": "circle", "steps": 1, "warmup": 0, "ddim_steps": 2,
                       "attack_steps": 2, "retain_batch": 2, "retain_prompts": ["a blue square"], "grid": 1,
                       "out": str(out), "preset": "paper"}, pipe=pipe)
    assert report["jobs"][0]["status"] == "done" and report["jobs"][0]["kind"] == "text_encoder"
    assert load_adapter(out).method == "advunlearn" and out.with_suffix(".grid.png").is_file()
