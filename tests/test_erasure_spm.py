"""SPM (erasure/spm.py): module selection, initial invariants, the adapter file, Facilitated Transport."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from unsee.adapters import load_adapter
from unsee.erasure import ConfigError, SPMConfig, SPMTrainer, spm_modules, transport_strength
from unsee.testing import SD15_UNET_CONFIG, tiny_sd_pipeline

FAST = dict(concept="circle", ddim_steps=3, anchors=2, lr=1e-2)


def test_spm_targets_the_12_linear_and_conv_modules_of_each_of_sd15s_16_transformer_blocks():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    names = spm_modules(unet)
    assert len(names) == 192 == len(set(names))
    modules = dict(unet.named_modules())
    assert all(isinstance(modules[n], (nn.Linear, nn.Conv2d)) for n in names)
    blocks = {n.split(".transformer_blocks")[0].rsplit(".proj_", 1)[0] for n in names}
    assert len(blocks) == 16
    leaves = sorted({n.split(".transformer_blocks.0.")[-1] if ".transformer_blocks.0." in n else n.rsplit(".", 1)[-1]
                     for n in names})
    assert leaves == sorted(["proj_in", "proj_out", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                             "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"])


def test_spm_at_initialisation_is_the_base_model_bit_for_bit():
    pipe = tiny_sd_pipeline()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = pipe.unet(x, 500, text).sample
        pipe.unet.add_adapter(SPMTrainer(SPMConfig(concept="circle")).lora_config(pipe.unet))
        after = pipe.unet(x, 500, text).sample
    assert torch.equal(before, after)


def test_first_step_anchor_loss_is_zero_and_weights_are_restored():
    pipe = tiny_sd_pipeline()
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    trainer = SPMTrainer(SPMConfig(steps=1, **FAST))
    adapter = trainer.train(pipe)
    assert trainer.last_terms["anchor"] == 0.0 and trainer.last_terms["erase"] > 0
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in state.items())
    modules = spm_modules(pipe.unet)
    assert adapter.kind == "lora" and adapter.rank == 1 and adapter.alpha == 1.0
    downs = {k[len("unet."):-len(".lora_A.weight")] for k in adapter.tensors if k.endswith(".lora_A.weight")}
    ups = {k[len("unet."):-len(".lora_B.weight")] for k in adapter.tensors if k.endswith(".lora_B.weight")}
    assert downs == ups == set(modules)
    assert adapter.training["modules"] == len(modules)


def test_transport_strength_works_on_sdxl_pipelines():
    from unsee.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    assert transport_strength(pipe, ["circle"], ["circle"]) == pytest.approx(1.0)
    assert 0.0 <= transport_strength(pipe, ["a blue square"], ["circle"]) <= 1.0


def test_spm_adapter_file_round_trips_and_loads_with_diffusers(tmp_path):
    pipe = tiny_sd_pipeline()
    adapter = SPMTrainer(SPMConfig(steps=2, **FAST)).train(pipe)
    path = adapter.save(tmp_path / "spm-circle.safetensors")
    loaded = load_adapter(path)
    assert loaded.method == "spm" and loaded.concepts == ["circle"] and loaded.hyperparameters["facilitated_transport"]
    assert set(loaded.tensors) == set(adapter.tensors)
    pipe.load_lora_weights(str(path))  # a plain diffusers LoRA file
    assert pipe.unet.peft_config


def test_transport_strength_is_one_for_the_concept_and_in_unit_interval_otherwise():
    pipe = tiny_sd_pipeline()
    assert transport_strength(pipe, ["circle"], ["circle"]) == pytest.approx(1.0)
    assert transport_strength(pipe, ["a red circle on a gray background"], ["circle"]) == 1.0  # token overlap
    for prompt in ["a blue square", "a green star on a white background", "xyz"]:
        assert 0.0 <= transport_strength(pipe, [prompt], ["circle"]) <= 1.0


def test_facilitated_transport_scales_the_delta_linearly_for_the_call_only(tmp_path):
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    path = SPMTrainer(SPMConfig(steps=3, **FAST)).train(pipe).save(tmp_path / "spm.safetensors")
    prompt = "a blue square"
    strength = transport_strength(pipe, [prompt], ["circle"])
    assert 0.0 < strength < 1.0

    def image(**kwargs):
        return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                    **kwargs).images

    name = pipe.load_erasure(path)  # SPM: transport on by default
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    transported = image()
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in weights.items())  # restored after the call
    pipe.unload_erasure(name)
    pipe.load_erasure(path, scale=strength, facilitated_transport=False)
    manual = image()
    assert transported == pytest.approx(manual, abs=1e-6)


@pytest.mark.parametrize("field, value", [("rank", 0), ("la_strength", -1.0), ("anchors", -1), ("ddim_steps", 1),
                                          ("alpha", 0.0), ("facilitated_transport", "yes")])
def test_invalid_spm_config_fails_on_construction(field, value):
    with pytest.raises(ConfigError, match=field):
        SPMConfig(concept="circle", **{field: value})


def test_spm_is_deterministic_for_its_seed_whatever_the_global_generator_did():
    """peft initialises LoRA down weights from torch's global generator; the trainer seeds it from its config."""
    results = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        adapter = SPMTrainer(SPMConfig(steps=2, **FAST)).train(tiny_sd_pipeline())
        results.append(adapter.tensors)
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_in_context_erase_term_anchors_at_the_drawn_prompt():
    # with guidance 0 the in-context target is c_from's own frozen prediction, which the fresh adapter matches;
    # the paper's target anchors at "" instead, so the same step has a positive erase term
    in_context = SPMTrainer(SPMConfig(steps=1, guidance=0.0, erase_from=["a red circle", "a blue circle"], **FAST))
    in_context.train(tiny_sd_pipeline())
    assert in_context.last_terms["erase"] < 1e-12
    assert in_context.last_terms["anchor"] == 0.0
    bare = SPMTrainer(SPMConfig(steps=1, guidance=0.0, **FAST))
    bare.train(tiny_sd_pipeline())
    assert bare.last_terms["erase"] > 1e-6


def test_a_preserved_prompt_joins_the_anchoring_term():
    # no random anchors: the anchor term is the preserved prompt's alone, 0 while the adapter is the identity (step 1)
    # and positive once a step has changed it; without preserve it stays exactly 0
    def anchor_terms(**settings):
        trainer = SPMTrainer(SPMConfig(steps=2, **{**FAST, "anchors": 0}, **settings))
        terms = []
        trainer.train(tiny_sd_pipeline(), progress=lambda event: event.phase == "train" and event.loss is not None
                      and terms.append(trainer.last_terms["anchor"]))
        return terms

    preserved = anchor_terms(preserve=["a blue square", "a green star"])
    assert preserved[0] == 0.0 and preserved[1] > 1e-9
    assert anchor_terms() == [0.0, 0.0]


@pytest.mark.parametrize("settings, named", [({"preserve": ["a red circle"]}, "circle"),
                                             ({"concepts": ["star"], "preserve": ["a square", "a red star"]}, "star")])
def test_a_preserved_prompt_naming_an_erased_concept_is_refused(settings, named):
    with pytest.raises(ConfigError, match=f"preserve prompt .* names the erased concept '{named}'"):
        SPMConfig(concept="circle", **settings)


@pytest.mark.parametrize("value", ["", [], ["a circle", ""], 3])
def test_invalid_erase_from_is_refused(value):
    with pytest.raises(ConfigError, match="erase_from"):
        SPMConfig(concept="circle", erase_from=value)
