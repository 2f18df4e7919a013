"""Issue 22, items 7-10 (trainers on real models): no toy-world prompts on other models, the caller's pipeline handed
back exactly as it came, safe settings changed on resume (the NaN advice works), the loss space of v-prediction
models; issue 23: the trainers know no prompt world (the toy preset gives its prompts as lists). Tiny pipelines,
1-3 training steps each."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor

from unsee.erasure import (
    METHODS,
    AdvUnlearnConfig,
    AdvUnlearnTrainer,
    ANTConfig,
    ANTTrainer,
    ConfigError,
    ESDConfig,
    ESDTrainer,
    SalUnConfig,
    SalUnTrainer,
    TrainingError,
    load_checkpoint,
    make_trainer,
)
from unsee.erasure.adapter_builders import delta_adapter_from_weights
from unsee.erasure.advunlearn import COCO_OBJECTS
from unsee.erasure.fields import canonical_dtype
from unsee.erasure.salun import saliency_prompts
from unsee.erasure.sampling import epsilon_from_output
from unsee.jobs import plan_jobs
from unsee.testing import tiny_sd_pipeline, tiny_sdxl_pipeline
from unsee.toy import TOY_MODEL_DIR
from unsee.toy.presets import TOY_PRESETS, WORLD_PROMPT_KEYS, is_toy_model_name, is_toy_pipeline, preset_settings

from unsee.toy import world


def _record_prompts(pipe) -> list[str]:
    """Every prompt the pipeline encodes from now on (the trainers encode through ``pipe.encode_prompt``)."""
    seen: list[str] = []
    original = pipe.encode_prompt

    def encode_prompt(prompt, *args, **kwargs):
        seen.extend([prompt] if isinstance(prompt, str) else list(prompt))
        return original(prompt, *args, **kwargs)

    pipe.encode_prompt = encode_prompt
    return seen


# ------------------------------------------------------------------------ 7: toy prompts go to the toy model only


def test_salun_on_another_model_uses_the_config_and_its_template_never_the_toy_world():
    with pytest.raises(ConfigError, match="relabel_prompts"):  # "circle" is a toy-world word: no made-up data
        SalUnConfig(concept="circle")
    pipe = tiny_sd_pipeline()
    seen = _record_prompts(pipe)
    config = SalUnConfig(concept="circle", relabel_prompts=["a photo of a square"],
                         retain_prompts=["a photo of a car", "a painting of a {concept}-free garden"],
                         num_forget=2, num_retain=2, batch_size=2, generation_steps=2, steps=1)
    SalUnTrainer(config).train(pipe)
    assert set(seen) == {"", "a photo of circle", "a photo of a square", "a photo of a car",
                         "a painting of a circle-free garden"}


def test_ant_on_another_model_augments_with_the_concept_alone():
    pipe = tiny_sd_pipeline()
    seen = _record_prompts(pipe)
    ANTTrainer(ANTConfig(concept="circle", ddim_steps=4, before_step=2, saliency_iterations=1, saliency_seeds=[0],
                         steps=1)).train(pipe)
    assert set(seen) == {"", "circle"}  # not the toy world's synonyms ("ball", "disc")


def test_advunlearn_on_another_model_retains_the_coco_set():
    pipe = tiny_sd_pipeline()
    seen = _record_prompts(pipe)
    trainer = AdvUnlearnTrainer(AdvUnlearnConfig(concept="star", steps=1, warmup=1, ddim_steps=2, retain_batch=2))
    trainer.train(pipe)
    coco = [f"a photo of a {name}" for name in COCO_OBJECTS]
    assert trainer.retain_prompts == coco  # not toy-world prompts that do not name "star"
    assert set(seen) == {"star", ""} | set(coco)


def _salun_world_lists(concept: str, seed: int, num_forget: int, num_retain: int) -> dict:
    """SalUn's prompt sets from the toy world, as the toy preset computes them."""
    from unsee.toy.presets import relabel_prompt

    forget = world.concept_prompts(concept, seed, num_forget)
    return {"forget_prompts": forget, "relabel_prompts": [relabel_prompt(p, concept) for p in forget],
            "retain_prompts": world.other_prompts(concept, seed + 1, num_retain)}


@pytest.mark.parametrize("method", ["salun", "ant", "advunlearn"])
def test_toy_world_is_no_setting_of_a_trainer(method):
    """The trainers know no prompt world: the toy preset passes the world's prompts as ordinary lists."""
    with pytest.raises(ConfigError, match=f"{method} has no setting 'toy_world'"):
        make_trainer(method, concept="circle", toy_world=True)
    with pytest.raises(TypeError, match="toy_world"):
        METHODS[method].config(concept="circle", toy_world=True)


def test_a_concept_outside_the_world_gets_no_world_prompts():
    for method in ("salun", "ant", "advunlearn"):
        settings = preset_settings("toy", method, model="toy", concept="Van Gogh")
        assert not set(WORLD_PROMPT_KEYS) & set(settings), method
    with pytest.raises(ConfigError, match="relabel_prompts"):  # SalUn then needs the user's lists
        make_trainer("salun", **preset_settings("toy", "salun", model="toy", concept="Van Gogh"), concept="Van Gogh")


def test_a_checkpoint_that_drew_toy_world_prompts_cannot_resume(tmp_path):
    config = SalUnConfig(concept="circle", num_forget=2, num_retain=2, batch_size=2, generation_steps=2, steps=2,
                         checkpoint_every=1, **_salun_world_lists("circle", 0, 2, 2))
    pipe = tiny_sd_pipeline()
    SalUnTrainer(config).train(pipe, checkpoint_dir=tmp_path)
    state = load_checkpoint(tmp_path)
    older = {**state["config"], "toy_world": True, "forget_prompts": None, "relabel_prompts": None,
             "retain_prompts": None}
    torch.save({**state, "config": older}, tmp_path / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"toy world \(toy_world, a setting of earlier versions\).*fresh run") as error:
        SalUnTrainer(config).train(pipe, checkpoint_dir=tmp_path, resume=True)
    assert "\n" not in str(error.value)
    # toy_world off: the prompts were the config's lists, so the run resumes
    torch.save({**state, "config": {**state["config"], "toy_world": False}}, tmp_path / "checkpoint.pt")
    adapter = SalUnTrainer(SalUnConfig(**{**config.__dict__, "steps": 3})).train(pipe, checkpoint_dir=tmp_path,
                                                                                  resume=True)
    assert adapter.training["resumed_from_step"] == 2


def test_the_toy_preset_gives_world_prompts_to_the_toy_model_only(tmp_path):
    toy = preset_settings("toy", "salun", model="toy", concept="circle")
    assert toy["num_forget"] == TOY_PRESETS["salun"]["num_forget"]
    assert {k: toy[k] for k in ("forget_prompts", "relabel_prompts", "retain_prompts")} == _salun_world_lists(
        "circle", 0, toy["num_forget"], toy["num_retain"])
    assert preset_settings("toy", "esd-u", model=str(TOY_MODEL_DIR), concept="circle")["erase_from"]  # its folder
    for model in ("some/model", str(tmp_path / "sd15"), str(tmp_path / "sd15.safetensors")):
        assert not is_toy_model_name(model)
        for method in METHODS:
            for concept in ("circle", "red", "striped"):
                settings = preset_settings("toy", method, model=model, concept=concept)
                assert not set(WORLD_PROMPT_KEYS) & set(settings), (model, method, concept)
                assert settings["steps"] >= TOY_PRESETS[method]["steps"]  # the preset's numbers still apply
    jobs, _ = plan_jobs({"model": "some/model", "preset": "toy", "method": ["esd-u", "spm", "advunlearn", "ant"],
                         "concept": "circle", "out_dir": str(tmp_path)})
    assert all(job.config.erase_from is None and getattr(job.config, "retain_prompts", None) is None
               and getattr(job.config, "saliency_prompts", None) is None for job in jobs)
    with pytest.raises(ConfigError, match="relabel_prompts"):  # SalUn on a real model: the user's lists
        plan_jobs({"model": "some/model", "preset": "toy", "method": "salun", "concept": "circle"})
    (salun,), _ = plan_jobs({"method": "salun", "concept": "circle", "out_dir": str(tmp_path)})  # model: toy
    config = salun.config
    assert config.forget_prompts == world.concept_prompts("circle", config.seed, config.num_forget)


def test_a_job_planned_for_the_toy_model_refuses_another_pipeline(tmp_path):
    from unsee.jobs import run_jobs

    pipe = tiny_sd_pipeline()
    with pytest.raises(ConfigError, match="not the embedded toy model"):
        run_jobs({"method": "advunlearn", "concept": "circle", "steps": 1, "ddim_steps": 2, "grid": 0,
                  "out": str(tmp_path / "a.safetensors")}, pipe=pipe)
    assert not (tmp_path / "a.safetensors").exists()


def test_only_the_embedded_toy_model_is_recognised_as_the_toy():
    sd, sdxl = tiny_sd_pipeline(), tiny_sdxl_pipeline()
    assert not is_toy_pipeline(sd) and not is_toy_pipeline(sdxl)  # the tiny tokenizer knows the world's words too


@pytest.mark.toy
@pytest.mark.skipif(not (TOY_MODEL_DIR / "model_index.json").is_file(), reason="the toy model is not installed")
def test_toy_world_prompts_train_on_the_embedded_toy_model():
    from unsee.loading import load_pipeline

    pipe = load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    assert is_toy_pipeline(pipe)
    seen = _record_prompts(pipe)
    trainer = SalUnTrainer(SalUnConfig(concept="circle", num_forget=2, num_retain=2, batch_size=2, generation_steps=2,
                                       steps=1, **_salun_world_lists("circle", 0, 2, 2)))
    trainer.train(pipe)
    forget, relabel, retain = (set(p) for p in saliency_prompts(trainer.config))
    assert all("circle" in p for p in forget) and set(seen) == {""} | forget | relabel | retain


# ------------------------------------------------------------------------ 8: dtype spellings, the pipeline handed back


@pytest.mark.parametrize("spelling, name", [
    (torch.bfloat16, "bfloat16"), ("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("torch.bfloat16", "bfloat16"),
    ("BF16", "bfloat16"), (torch.float16, "float16"), ("fp16", "float16"), ("float16", "float16"), ("half", "float16"),
    ("fp32", "float32"), ("torch.float32", "float32"), (torch.float32, "float32"), (None, None),
])
def test_trainer_configs_take_the_clis_dtype_spellings(spelling, name):
    assert canonical_dtype(spelling) == name
    assert ESDConfig(concept="circle", dtype=spelling).dtype == name
    assert make_trainer("esd-x", concept="circle", dtype=spelling).config.dtype == name


@pytest.mark.parametrize("bad", ["int8", "fp8", torch.int8, 16, ""])
def test_other_dtypes_are_refused(bad):
    with pytest.raises(ConfigError, match="dtype"):
        ESDConfig(concept="circle", dtype=bad)


def _pipeline_state(pipe) -> dict:
    state = {}
    for component, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
                state[component, name] = (tensor.detach().clone(), tensor.data_ptr(), tensor.device, tensor.requires_grad,
                                          getattr(tensor, "grad", None))
    return state


def _assert_handed_back(pipe, state, processors) -> None:
    now = _pipeline_state(pipe)
    assert now.keys() == state.keys()
    for key, (value, pointer, device, requires_grad, grad) in state.items():
        v, p, d, r, g = now[key]
        assert v.dtype == value.dtype and d == device and torch.equal(v, value), key  # dtype, device, bits
        assert p == pointer and r == requires_grad and g is grad, key  # the same storage, flag and gradient
    assert all(pipe.unet.attn_processors[k] is v for k, v in processors.items())
    assert not getattr(pipe.unet, "peft_config", None)
    assert not any("forward" in vars(module) for module in (pipe.unet, pipe.text_encoder, pipe.vae))  # no wrapper


def _prepared_pipeline():
    """A float32 tiny pipeline with an erasure adapter loaded, its own attention processors, a frozen VAE and a
    gradient on one text-encoder weight: everything training must leave as it is."""
    pipe = tiny_sd_pipeline()
    name, param = next(iter(pipe.unet.named_parameters()))
    adapter = delta_adapter_from_weights({name: param.detach().clone()}, {name: param.detach() + 0.01}, "unet",
                                         method="esd-x", concepts=["x"], model=pipe)
    pipe.load_erasure(adapter, adapter_name="user-adapter")
    pipe.unet.set_attn_processor(AttnProcessor())
    pipe.vae.requires_grad_(False)
    weight = next(iter(pipe.text_encoder.parameters()))
    weight.grad = torch.ones_like(weight)
    return pipe, {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one state per process and refuses another mixed_precision later in it: reset around the test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.parametrize("method, settings", [
    ("esd-x", dict(kind="delta")), ("esd-x", dict(kind="lora")),
    ("esd-x", dict(kind="delta", mixed_precision="bf16", device="cpu")),  # autocast wraps the UNet's forward
    ("advunlearn", dict(retain_prompts=["a red heart"], retain_batch=1, warmup=2)),
], ids=["delta", "lora", "delta-autocast", "advunlearn"])
def test_training_in_bfloat16_hands_the_pipeline_back_exactly_as_it_came(method, settings, fresh_accelerate_state):
    pipe, merged = _prepared_pipeline()
    state, processors = _pipeline_state(pipe), dict(pipe.unet.attn_processors)
    adapter = make_trainer(method, concept="circle", steps=2, ddim_steps=2, lr=1e-2, dtype="bfloat16",
                           **settings).train(pipe)
    assert adapter.hyperparameters["dtype"] == "bfloat16" and adapter.training["losses"]
    _assert_handed_back(pipe, state, processors)
    assert pipe.active_erasures == {"user-adapter": 1.0}
    pipe.unload_erasure()
    assert not all(torch.equal(p, merged[n]) for n, p in pipe.unet.named_parameters())  # the user's adapter unloads
    pipe.load_erasure(adapter)  # and the new adapter loads in the pipeline's own precision
    pipe.unload_erasure()


class _NaNAtStep2(ESDTrainer):
    def training_step(self, step):
        loss = super().training_step(step)
        return loss * float("nan") if step == 1 else loss


def test_a_failed_low_precision_run_also_hands_the_pipeline_back():
    pipe, _ = _prepared_pipeline()
    state, processors = _pipeline_state(pipe), dict(pipe.unet.attn_processors)
    with pytest.raises(TrainingError, match="became nan"):
        _NaNAtStep2(ESDConfig(concept="circle", variant="esd-u", steps=3, ddim_steps=2, dtype="bfloat16")).train(pipe)
    _assert_handed_back(pipe, state, processors)


# ------------------------------------------------------------------------ 9: resume with safe changes


FAST = dict(concept="circle", variant="esd-x", ddim_steps=3, checkpoint_every=2)


class _NaNAtStep5(ESDTrainer):
    def training_step(self, step):
        loss = super().training_step(step)
        return loss * float("nan") if step == 4 else loss


def test_the_nan_advice_works_resume_with_a_lower_learning_rate_in_float32(tmp_path):
    pipe = tiny_sd_pipeline()
    with pytest.raises(TrainingError) as error:
        _NaNAtStep5(ESDConfig(steps=8, lr=1e-2, dtype="bfloat16", **FAST)).train(pipe, checkpoint_dir=tmp_path)
    message = str(error.value)
    lower = re.search(r"--resume --lr (\S+?)\)", message).group(1)
    assert f"lr={lower}" in message and "--dtype float32" in message and float(lower) < 1e-2
    assert load_checkpoint(tmp_path)["step"] == 4
    # what the message says: the same settings with the lower learning rate (and float32), resumed
    adapter = ESDTrainer(ESDConfig(steps=8, lr=float(lower), dtype="float32", **FAST)).train(
        pipe, checkpoint_dir=tmp_path, resume=True)
    assert adapter.training["resumed_from_step"] == 4 and len(adapter.training["losses"]) == 8
    assert adapter.training["resumed_with"] == {"lr": {"checkpoint": 1e-2, "now": float(lower)},
                                                "dtype": {"checkpoint": "bfloat16", "now": "float32"}}
    assert adapter.hyperparameters["lr"] == float(lower)
    assert load_checkpoint(tmp_path)["config"]["lr"] == float(lower)  # later checkpoints hold the new settings


def test_a_resumed_run_trains_with_the_new_learning_rate(tmp_path):
    pipe = tiny_sd_pipeline()
    ESDTrainer(ESDConfig(steps=2, lr=1e-2, **FAST)).train(pipe, checkpoint_dir=tmp_path)
    saved = load_checkpoint(tmp_path)["trained"]
    final = {}

    def progress(event):
        if event.phase == "train" and event.step == event.total:
            final.update({n: p.detach().clone() for n, p in pipe.unet.named_parameters() if n in saved})

    # with lr 1e-12 the step after the checkpoint barely moves the weights (at the checkpoint's 1e-2 Adam moves
    # each by about 1e-2)
    ESDTrainer(ESDConfig(steps=3, lr=1e-12, **{**FAST, "checkpoint_every": 0})).train(
        pipe, progress=progress, checkpoint_dir=tmp_path, resume=True)
    assert final.keys() == saved.keys()
    assert max(float((final[n] - saved[n]).abs().max()) for n in saved) < 1e-9


def test_settings_that_change_what_a_checkpoint_means_are_still_refused(tmp_path):
    pipe = tiny_sd_pipeline()
    ESDTrainer(ESDConfig(steps=2, lr=1e-2, **FAST)).train(pipe, checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"other settings \(eta=1.0 there, 3.0 here\).*only steps, lr"):
        ESDTrainer(ESDConfig(steps=4, lr=1e-3, eta=3.0, **FAST)).train(pipe, checkpoint_dir=tmp_path, resume=True)


# ------------------------------------------------------------------------ 10: the loss space


def test_epsilon_from_output_inverts_each_parametrisation():
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, prediction_type="v_prediction")
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 500, 990])
    x_t = scheduler.add_noise(x0, eps, t)
    v = scheduler.get_velocity(x0, eps, t)
    assert torch.allclose(epsilon_from_output(scheduler, v, x_t, t), eps, atol=1e-4)
    scheduler.register_to_config(prediction_type="sample")
    assert torch.allclose(epsilon_from_output(scheduler, x0, x_t, t), eps, atol=1e-3)
    scheduler.register_to_config(prediction_type="epsilon")
    assert epsilon_from_output(scheduler, eps, x_t, t) is eps


class _RecordingESD(ESDTrainer):
    timesteps: list

    def sample_xt(self, *args, **kwargs):
        x_t, x_keep, t = super().sample_xt(*args, **kwargs)
        self.timesteps.append(int(t))
        return x_t, x_keep, t


def _esd_first_loss(loss_space, prediction_type="v_prediction"):
    pipe = tiny_sd_pipeline().to(dtype=torch.float64)  # float64: the ratio below is exact to rounding
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    trainer = _RecordingESD(ESDConfig(concept="circle", variant="esd-x", steps=1, ddim_steps=4, seed=1, lr=1e-4,
                                      loss_space=loss_space))
    trainer.timesteps = []
    adapter = trainer.train(pipe)
    return adapter, trainer.timesteps[0], pipe.scheduler.alphas_cumprod


def test_esd_loss_in_epsilon_space_is_alpha_squared_times_the_v_loss():
    out, t, alphas_cumprod = _esd_first_loss("output")
    eps, t_eps, _ = _esd_first_loss("epsilon")
    assert t == t_eps and alphas_cumprod[t] < 0.9  # a noisy step, where the two spaces differ
    assert eps.training["loss_first"] / out.training["loss_first"] == pytest.approx(float(alphas_cumprod[t]), rel=1e-6)
    assert eps.hyperparameters["loss_space"] == "epsilon" and out.hyperparameters["loss_space"] == "output"


def test_on_an_epsilon_prediction_model_both_loss_spaces_are_the_same():
    out, _, _ = _esd_first_loss("output", "epsilon")
    eps, _, _ = _esd_first_loss("epsilon", "epsilon")
    assert out.training["losses"] == eps.training["losses"]
    assert all(torch.equal(out.tensors[k], eps.tensors[k]) for k in out.tensors)


class _RecordingSalUn(SalUnTrainer):
    timesteps: list

    def _noised(self, x0, generator=None):
        x_t, noise, t = super()._noised(x0, generator)
        if generator is None:  # a training step's draw (the mask's draws come with their own generator)
            self.timesteps.append(int(t[0]))
        return x_t, noise, t


@pytest.mark.parametrize("alpha, term", [(0.0, "forget"), (1e6, "retain")])
def test_salun_loss_in_epsilon_space_is_alpha_squared_times_the_v_loss(alpha, term):
    losses, timesteps = {}, {}
    for space in ("output", "epsilon"):
        pipe = tiny_sd_pipeline().to(dtype=torch.float64)
        trainer = _RecordingSalUn(SalUnConfig(
            concept="circle", forget_prompts=["a red circle"], relabel_prompts=["a red square"],
            retain_prompts=["a green star"], num_forget=1, num_retain=1, batch_size=1, generation_steps=2, steps=1,
            alpha=alpha, loss_space=space))
        trainer.timesteps = []
        losses[space] = trainer.train(pipe).training["loss_first"]
        timesteps[space] = trainer.timesteps
    assert timesteps["output"] == timesteps["epsilon"]
    t = timesteps["output"][0 if term == "forget" else 1]  # the step draws the forget row first, then the retain row
    alphas_cumprod = tiny_sd_pipeline().scheduler.alphas_cumprod
    # with alpha 1e6 the retain term is the whole loss to 1e-6 (the forget term is of the same order before weighting)
    assert losses["epsilon"] / losses["output"] == pytest.approx(float(alphas_cumprod[t]), rel=1e-5)


def test_loss_space_is_validated():
    for make in (lambda: ESDConfig(concept="circle", loss_space="v"),
                 lambda: SalUnConfig(concept="circle", relabel_prompts=["a square"], retain_prompts=["a star"],
                                     loss_space="eps")):
        with pytest.raises(ConfigError, match="loss_space"):
            make()


def test_grid_prompts_come_from_the_toy_world_only_on_the_toy_model():
    from unsee.jobs import grid_prompts

    assert grid_prompts("circle", 3) == ["a photo of circle"] * 3
    toy = grid_prompts("circle", 3, toy=True)
    assert len(toy) == 3 and all("circle" in p and p != "a photo of circle" for p in toy)
    assert grid_prompts("nudity", 2, toy=True) == ["a photo of nudity"] * 2, "a concept the world lacks"


@pytest.mark.parametrize("method", ["esd-u", "spm"])
def test_a_job_with_the_toy_worlds_context_refuses_another_pipeline(tmp_path, method):
    from unsee.jobs import run_jobs

    pipe = tiny_sd_pipeline()
    with pytest.raises(ConfigError, match="planned for the embedded toy model with the toy world's prompts"):
        run_jobs({"method": method, "concept": "circle", "steps": 1, "ddim_steps": 2, "grid": 0,
                  "out": str(tmp_path / "e.safetensors")}, pipe=pipe)
    assert not (tmp_path / "e.safetensors").exists()
