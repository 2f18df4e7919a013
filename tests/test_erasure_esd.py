"""ESD on the tiny pipelines: the loss at step 0, the parameter sets, the teacher, LoRA output."""

import gc

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from unsee.adapters import load_adapter
from unsee.erasure import ConfigError, ESDConfig, ESDTrainer, esd_parameters
from unsee.testing import tiny_sd_pipeline


FAST = dict(ddim_steps=4, steps=1)


def _capture_unet_calls(unet):
    calls = []

    def hook(module, args, kwargs):
        calls.append((args[0].detach().clone(), args[1], kwargs["encoder_hidden_states"].shape[0]))

    return calls, unet.register_forward_pre_hook(hook, with_kwargs=True)


def _reference_eps(pipe, x_t, t, prompts):
    """Predictions of the original UNet, one prompt at a time (independent of the trainer's batching)."""
    embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    with torch.no_grad():
        return [pipe.unet(x_t, t, encoder_hidden_states=embeds[i: i + 1].to(x_t.dtype)).sample
                for i in range(len(prompts))]


def _initial_loss_and_expected(eta, factor, dtype=torch.float64, **config):
    # float64 by default: CPU kernels round differently for different batch sizes (~1e-6 relative in float32,
    # the trainer batches the teacher's predictions), which would blur a 1e-6 comparison of the formula
    pipe = tiny_sd_pipeline().to(dtype=dtype)
    calls, handle = _capture_unet_calls(pipe.unet)
    adapter = ESDTrainer(ESDConfig(concept="circle", variant="esd-x", eta=eta, lr=1e-4, **FAST, **config)).train(pipe)
    handle.remove()
    x_t, t, rows = calls[-1]  # the last call of step 0 is the student's, on x_t (then x_keep when preserving)
    assert rows == (2 if config.get("preserve") else 1)
    x_t = x_t[:1]
    eps_c, eps_empty = _reference_eps(pipe, x_t, t, ["circle", ""])  # weights were restored after training
    expected = factor(eta) * torch.mean((eps_c - eps_empty) ** 2).item()
    return adapter.training["losses"][0], expected


@pytest.mark.parametrize("eta", [1.0, 2.5])
def test_initial_loss_is_one_plus_eta_squared_times_guidance_energy(eta):
    loss, expected = _initial_loss_and_expected(eta, lambda e: (1 + e) ** 2)
    assert expected > 0
    assert loss == pytest.approx(expected, rel=1e-6)


def test_initial_loss_in_float32():
    loss, expected = _initial_loss_and_expected(1.0, lambda e: (1 + e) ** 2, dtype=torch.float32)
    assert loss == pytest.approx(expected, rel=2e-5)  # batch-size-dependent rounding only


def test_eta_zero_with_concept_anchor_has_zero_loss_at_step_zero():
    loss, expected = _initial_loss_and_expected(0.0, lambda e: e ** 2, anchor="concept")
    assert expected == 0.0
    assert loss == pytest.approx(0.0, abs=1e-12)


def test_official_rewrite_anchor_is_eta_squared():
    loss, expected = _initial_loss_and_expected(2.0, lambda e: e ** 2, anchor="concept")
    assert loss == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("erase_from", ["red circle", ["red circle", "a blue circle", "circle on black"]])
def test_erase_from_initial_loss_is_eta_squared(erase_from):
    loss, expected = _initial_loss_and_expected(1.5, lambda e: e ** 2, erase_from=erase_from)
    assert expected > 0
    assert loss == pytest.approx(expected, rel=1e-6)


def test_erase_from_a_list_draws_one_prompt_per_step():
    pipe = tiny_sd_pipeline()
    froms = ["red circle", "a blue circle", "circle on black"]
    embeds, _ = pipe.encode_prompt(froms, "cpu", 1, False)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["encoder_hidden_states"][0]) if kw["encoder_hidden_states"].shape[0] == 1
        and torch.is_grad_enabled() else None, with_kwargs=True)
    ESDTrainer(ESDConfig(concept="circle", variant="esd-x", lr=1e-4, steps=12, ddim_steps=2, erase_from=froms)).train(pipe)
    hook.remove()
    used = {next(i for i in range(3) if torch.equal(e, embeds[i])) for e in seen}  # the student's rows
    assert len(seen) == 12 and used == {0, 1, 2}
    assert ESDConfig(concept="circle", erase_from=["a", "b"]).erase_from == ("a", "b")
    for bad in ([], ["a", ""], [3]):
        with pytest.raises(ConfigError, match="erase_from must be"):
            ESDConfig(concept="circle", erase_from=bad)


def _expected_modules(unet, keep):
    return {name for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and keep(name)}


@pytest.mark.parametrize("variant, keep", [
    ("esd-x", lambda n: ".attn2." in n),
    ("esd-x-strict", lambda n: n.endswith(("attn2.to_k", "attn2.to_v"))),
    ("esd-u", lambda n: ".attn2." not in n and not n.startswith(("conv_out", "time_embedding"))),
    ("esd-all", lambda n: True),
])
def test_variant_parameter_sets(tiny_sd, variant, keep):
    unet = tiny_sd.unet
    params = esd_parameters(unet, variant)
    modules = {name.rsplit(".", 1)[0] for name in params}
    assert modules == _expected_modules(unet, keep)
    assert not any("norm" in name for name in params)  # norms are never trained
    if variant == "esd-x":  # per cross-attention: q, k, v and out weights + the out bias
        blocks = sum(1 for n, _ in unet.named_modules() if n.endswith("attn2"))
        assert len(params) == 5 * blocks
    if variant == "esd-x-strict":
        assert all(name.endswith(("to_k.weight", "to_v.weight")) for name in params)
    if variant == "esd-u":
        assert "conv_in.weight" in params and "down_blocks.0.resnets.0.time_emb_proj.weight" in params
        assert "conv_out.weight" not in params and "time_embedding.linear_1.weight" not in params  # paper's rule


def test_sdxl_esd_u_keeps_block_modules_without_emb(tiny_sdxl):
    params = esd_parameters(tiny_sdxl.unet, "esd-u")
    modules = {name.rsplit(".", 1)[0] for name in params}
    assert modules == _expected_modules(tiny_sdxl.unet, lambda n: ".attn2." not in n and "block" in n and "emb" not in n)
    assert "conv_in.weight" not in params and not any("add_embedding" in n or "time_emb" in n for n in params)
    assert len(esd_parameters(tiny_sdxl.unet, "esd-x")) > 0


def test_only_selected_tensors_change_and_adapter_keys_equal_the_selection(tmp_path):
    pipe = tiny_sd_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    selected = set(esd_parameters(pipe.unet, "esd-x-strict"))
    seen = {}

    def progress(event):
        if event.phase == "train" and event.step == event.total:  # weights while trained, before the restore
            seen.update({k: v.clone() for k, v in pipe.unet.state_dict().items()})

    config = ESDConfig(concept="circle", variant="esd-x-strict", lr=1e-2, steps=2, ddim_steps=3)
    adapter = ESDTrainer(config).train(pipe, progress=progress)
    changed = {k for k in before if not torch.equal(before[k], seen[k])}
    assert changed == selected
    assert set(adapter.tensors) == {f"unet.{name}" for name in selected}
    assert adapter.kind == "delta" and adapter.method == "esd-x-strict" and adapter.concepts == ["circle"]
    # the pipeline is handed back unchanged, and the adapter reproduces the trained weights
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    path = adapter.save(tmp_path / "esd.safetensors")
    assert load_adapter(path).hyperparameters["variant"] == "esd-x-strict"
    pipe.load_erasure(path)
    for key in selected:
        assert torch.allclose(pipe.unet.state_dict()[key], seen[key], atol=1e-6)
    pipe.unload_erasure()


def test_teacher_is_the_same_unet_with_original_weights():
    pipe = tiny_sd_pipeline()
    reference = tiny_sd_pipeline().unet  # same seed: the original weights, built before training starts
    selected = set(esd_parameters(pipe.unet, "esd-x"))
    untrained = {n: p for n, p in pipe.unet.named_parameters() if n not in selected and p.numel() > 1 and p.std() > 0}
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    emb, _ = pipe.encode_prompt(["circle"], "cpu", 1, False)
    with torch.no_grad():
        original = reference(x, 500, encoder_hidden_states=emb).sample
    del reference
    checks = []
    trainer = ESDTrainer(ESDConfig(concept="circle", variant="esd-x", lr=1e-2, steps=2, ddim_steps=3))
    gc.collect()
    # UNets and tensors alive before training (other tests' module fixtures may hold same-seed pipelines): training
    # must add no UNet and no copy of the untrained weights. The list keeps them alive, so their ids are not reused.
    before = [o for o in gc.get_objects() if isinstance(o, (UNet2DConditionModel, torch.Tensor))]
    existing = {id(o) for o in before}

    def progress(event):
        if event.step != 2:
            return
        gc.collect()
        objects = gc.get_objects()
        unets = [o for o in objects if isinstance(o, UNet2DConditionModel) and id(o) not in existing]
        tensors = [o for o in objects if isinstance(o, torch.Tensor) and id(o) not in existing]
        copies = {n: sum(1 for t in tensors if t.shape == p.shape and t.dtype == p.dtype and torch.equal(t, p.detach()))
                  for n, p in untrained.items()}
        with torch.no_grad():
            student = pipe.unet(x, 500, encoder_hidden_states=emb).sample
            with trainer.frozen_teacher() as teacher:
                assert teacher is pipe.unet
                teacher_out = teacher(x, 500, encoder_hidden_states=emb).sample
        checks.append((len(unets), copies, student, teacher_out))

    trainer.train(pipe, progress=progress)
    (n_unets, copies, student, teacher_out), = checks
    assert n_unets == 0  # training built no second UNet module
    assert copies and all(count == 0 for count in copies.values())  # no copy of the untrained weights either
    assert torch.equal(teacher_out, original)  # the teacher is exactly the original model
    assert not torch.equal(student, original)  # while the student has moved


def test_lora_output_trains_only_lora_layers_and_loads(tmp_path):
    pipe = tiny_sd_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    config = ESDConfig(concept="circle", variant="esd-x", kind="lora", rank=2, lr=1e-2, steps=2, ddim_steps=3)
    adapter = ESDTrainer(config).train(pipe)
    assert adapter.kind == "lora" and adapter.rank == 2
    modules = {k[len("unet."):].rsplit(".lora_", 1)[0] for k in adapter.tensors}
    assert modules == {name.rsplit(".", 1)[0] for name in esd_parameters(pipe.unet, "esd-x")}
    # the LoRA layers are gone again and the weights are untouched
    after = pipe.unet.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not getattr(pipe.unet, "peft_config", None)
    # loaded (merged or as peft layers, as the pipeline applies LoRAs), it changes the UNet; unloaded, it is gone
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    emb, _ = pipe.encode_prompt(["circle"], "cpu", 1, False)
    with torch.no_grad():
        plain = pipe.unet(x, 500, encoder_hidden_states=emb).sample
        name = pipe.load_erasure(adapter.save(tmp_path / "lora.safetensors"))
        erased = pipe.unet(x, 500, encoder_hidden_states=emb).sample
        pipe.unload_erasure(name)
        again = pipe.unet(x, 500, encoder_hidden_states=emb).sample
    assert not torch.equal(erased, plain) and torch.equal(again, plain)


def test_sdxl_esd_u_trains_and_loads(tiny_sdxl):
    before = {k: v.clone() for k, v in tiny_sdxl.unet.state_dict().items()}
    adapter = ESDTrainer(ESDConfig(concept="circle", variant="esd-u", lr=1e-3, **FAST)).train(tiny_sdxl)
    assert set(adapter.tensors) == {f"unet.{n}" for n in esd_parameters(tiny_sdxl.unet, "esd-u")}
    assert all(torch.equal(before[k], v) for k, v in tiny_sdxl.unet.state_dict().items())
    tiny_sdxl.load_erasure(adapter)


def test_same_seed_same_adapter_and_frozen_sampling_option():
    def run(seed, sample_with="trained"):
        config = ESDConfig(concept="circle", variant="esd-x", lr=1e-2, steps=2, ddim_steps=3, seed=seed,
                           sample_with=sample_with)
        return ESDTrainer(config).train(tiny_sd_pipeline())

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first.tensors[k], again.tensors[k]) for k in first.tensors)
    assert any(not torch.equal(first.tensors[k], other.tensors[k]) for k in first.tensors)
    # step 0 samples with identical weights either way; later steps differ
    frozen = run(0, "frozen")
    assert frozen.training["losses"][0] == first.training["losses"][0]


def test_esd_config_defaults_are_the_papers():
    config = ESDConfig(concept="circle")
    assert (config.eta, config.lr, config.steps, config.start_guidance, config.ddim_steps) == (1.0, 1e-5, 1000, 3.0, 50)
    assert config.anchor == "unconditional" and config.sample_with == "trained"
    with pytest.raises(ConfigError, match="anchor"):
        ESDConfig(concept="circle", anchor="cat")


def test_preserved_prompts_add_nothing_at_step_zero_and_hold_their_predictions():
    # the preserve term compares student and teacher on the preserved prompts: 0 while they are the same weights
    loss, expected = _initial_loss_and_expected(1.0, lambda e: (1 + e) ** 2, preserve=["square", "a red star"])
    assert loss == pytest.approx(expected, rel=1e-6)
    pipe = tiny_sd_pipeline().to(dtype=torch.float64)

    # trained longer, the preserve term keeps "square" closer to the original model
    torch.manual_seed(0)
    size = pipe.unet.config.sample_size
    x_t = torch.randn(1, pipe.unet.config.in_channels, size, size, dtype=torch.float64)
    (original,) = _reference_eps(pipe, x_t, 500, ["square"])

    def drift(weight):
        config = ESDConfig(concept="circle", variant="esd-x", lr=1e-3, steps=20, ddim_steps=3, preserve=["square"],
                           preserve_weight=weight)
        name = pipe.load_erasure(ESDTrainer(config).train(pipe))
        (after,) = _reference_eps(pipe, x_t, 500, ["square"])
        pipe.unload_erasure(name)
        return torch.mean((after - original) ** 2).item()

    assert drift(1.0) < 0.5 * drift(0.0)
    with pytest.raises(ConfigError, match="preserve must be"):
        ESDConfig(concept="circle", preserve="square")
    with pytest.raises(ConfigError, match="preserve_weight"):
        ESDConfig(concept="circle", preserve=["square"], preserve_weight=-1)
