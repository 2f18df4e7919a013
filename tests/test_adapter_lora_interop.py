"""Erasure adapters next to a user's own LoRAs (issue 23 items 1-2).

A user's LoRA (peft, saved with save_lora_weights, loaded with load_lora_weights) and an erasure adapter (lora
kind: a peft adapter; delta kind: merged), in every order, fused and unfused, with set_adapters: the images equal
a reference made with plain diffusers (user LoRA alone / both / none) within 1e-5, and unloading everything gives
the original weights back, bit for bit where nothing was fused. Also: per-prompt scales registered by the method
(and found through the entry point), and files written now read by the previous release's reader.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.util  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: E402
from peft import LoraConfig, get_peft_model_state_dict  # noqa: E402

from unsee.adapters import Adapter, AdapterError, fingerprint, load_adapter, save_adapter  # noqa: E402
from unsee.pipelines import erasure as erasure_module  # noqa: E402
from unsee.testing import tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402
from conftest import bits, snapshot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on a gray background"
SCALE = 0.8
USER_UNET_TARGETS = ["to_q", "to_k", "conv_in"]
USER_TE_TARGETS = ["q_proj", "v_proj"]
ERASE_LORA = [
    ("unet", "conv_in"),  # also in the user's LoRA
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),  # also in the user's LoRA
    ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"),
    ("unet", "mid_block.attentions.0.proj_in"),
    ("text_encoder", "encoder.layers.0.self_attn.q_proj"),  # also in the user's LoRA
]
ERASE_DELTA = [
    ("unet", "conv_in.weight"),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
    ("unet", "up_blocks.1.resnets.0.conv1.weight"),
    ("text_encoder", "encoder.layers.0.self_attn.q_proj.weight"),
]
SDXL_ERASE_LORA = [
    ("unet", "conv_in"),
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj"),
]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def assert_weights_back(before, pipe, fused_targets=()):
    """Same tensors as ``before``; bit for bit except in modules a fused LoRA touched (there within 1e-6)."""
    after = snapshot(pipe)
    assert set(after) == set(before)
    for key, value in before.items():
        if any(f".{target}." in f".{key}" for target in fused_targets):
            torch.testing.assert_close(after[key], value, rtol=0, atol=1e-6)
        else:
            assert torch.equal(bits(after[key]), bits(value)), key


def image(pipe, prompt=PROMPT):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


def close(got, expected):
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def differ(a, b):
    assert np.abs(a - b).max() > 1e-3


def write_user_lora(folder, plain_class, build, with_text_encoder=True, seed=11):
    """A user's LoRA made with peft and saved the diffusers way (alpha != r: the header config matters)."""
    src = build(plain_class)
    torch.manual_seed(seed)
    src.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=USER_UNET_TARGETS, init_lora_weights=False))
    layers = {"unet_lora_layers": get_peft_model_state_dict(src.unet),
              "unet_lora_adapter_metadata": src.unet.peft_config["default"].to_dict()}
    if with_text_encoder:  # by hand: transformers' add_adapter wants a newer peft than diffusers' loader does
        g, tensors = torch.Generator().manual_seed(seed), {}
        for path, module in src.text_encoder.named_modules():
            if path.rpartition(".")[2] in USER_TE_TARGETS:
                tensors[f"{path}.lora_A.weight"] = torch.randn(2, module.in_features, generator=g) * 0.3
                tensors[f"{path}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=g) * 0.3
        layers["text_encoder_lora_layers"] = tensors
        layers["text_encoder_lora_adapter_metadata"] = {"r": 2, "lora_alpha": 3.0, "target_modules": USER_TE_TARGETS}
    folder.mkdir(parents=True, exist_ok=True)
    plain_class.save_lora_weights(folder, **layers)
    return folder / "pytorch_lora_weights.safetensors"


def erasure_adapter(kind, build, modules=None, seed=1):
    pipe = build()
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    if kind == "delta":
        for component, name in modules or ERASE_DELTA:
            shape = dict(getattr(pipe, component).named_parameters())[name].shape
            tensors[f"{component}.{name}"] = torch.randn(shape, generator=g) * 0.2
    else:
        for component, path in modules or ERASE_LORA:
            weight = getattr(pipe, component).get_submodule(path).weight
            a, b = ((2, weight.shape[1]), (weight.shape[0], 2)) if weight.ndim == 2 else \
                ((2, *weight.shape[1:]), (weight.shape[0], 2, 1, 1))
            tensors[f"{component}.{path}.lora_A.weight"] = torch.randn(a, generator=g) * 0.4
            tensors[f"{component}.{path}.lora_B.weight"] = torch.randn(b, generator=g) * 0.4
    components = sorted({k.split(".", 1)[0] for k in tensors})
    return Adapter(kind=kind, method="esd-x", concepts=["circle"], tensors=tensors,
                   fingerprint=fingerprint(pipe, components), rank=2 if kind == "lora" else None,
                   alpha=3.0 if kind == "lora" else None)


def reference(build, plain_class, user=None, user_weight=1.0, erase=None, erase_path=None, scale=SCALE):
    """The image plain diffusers gives: a delta merged by hand, LoRAs through load_lora_weights/set_adapters."""
    pipe = build(plain_class)
    if erase is not None and erase.kind == "delta":
        with torch.no_grad():
            for key, delta in erase.tensors.items():
                component, name = key.split(".", 1)
                dict(getattr(pipe, component).named_parameters())[name].add_(delta, alpha=scale)
    names, weights = [], []
    if user is not None:
        pipe.load_lora_weights(str(user), adapter_name="style")
        names, weights = ["style"], [user_weight]
    if erase is not None and erase.kind == "lora":
        pipe.load_lora_weights(str(erase_path), adapter_name="erase")
        names, weights = names + ["erase"], weights + [scale]
    if names:
        pipe.set_adapters(names, weights)
    return image(pipe)


@pytest.fixture(scope="module")
def user_lora(tmp_path_factory):
    return write_user_lora(tmp_path_factory.mktemp("user"), StableDiffusionPipeline, tiny_sd_pipeline)


@pytest.fixture(scope="module", params=["lora", "delta"])
def erasure(request, tmp_path_factory):
    adapter = erasure_adapter(request.param, tiny_sd_pipeline)
    return adapter, save_adapter(adapter, tmp_path_factory.mktemp("erase") / "erase.safetensors")


@pytest.fixture(scope="module")
def refs(user_lora, erasure):
    adapter, path = erasure

    def ref(user=False, user_weight=1.0, erase=False, scale=SCALE):
        return reference(tiny_sd_pipeline, StableDiffusionPipeline, user=user_lora if user else None,
                         user_weight=user_weight, erase=adapter if erase else None, erase_path=path, scale=scale)

    table = {"none": ref(), "user": ref(user=True), "erase": ref(erase=True), "both": ref(user=True, erase=True)}
    differ(table["both"], table["user"])  # each of them changes the images
    differ(table["both"], table["erase"])
    differ(table["user"], table["none"])
    table["ref"] = ref
    return table


def fused_user_targets():
    return [*USER_UNET_TARGETS, *USER_TE_TARGETS]


# ---------------------------------------------------------------------------------------------
# the user's LoRA after the erasure adapter: fused, then the erasure unloaded (the regression)
# ---------------------------------------------------------------------------------------------


def test_erasure_then_user_lora_fused_then_everything_unloaded(erasure, user_lora, refs):
    adapter, path = erasure
    pipe = tiny_sd_pipeline()
    base = snapshot(pipe)
    pipe.load_erasure(path, scale=SCALE, adapter_name="erase")
    close(image(pipe), refs["erase"])
    pipe.load_lora_weights(str(user_lora), adapter_name="style")  # diffusers would make only "style" active
    close(image(pipe), refs["both"])

    pipe.set_adapters(["style"], [0.5])  # the erasure adapter stays active at its scale
    assert pipe.active_erasures == {"erase": SCALE}
    close(image(pipe), refs["ref"](user=True, user_weight=0.5, erase=True))
    pipe.set_adapters("style")
    close(image(pipe), refs["both"])

    pipe.fuse_lora()  # fuses the user's LoRA only
    assert pipe.fused_loras == {"style"}
    close(image(pipe), refs["both"])
    pipe.unload_erasure()  # the fused LoRA stays (it used to be dropped)
    assert pipe.active_erasures == {}
    close(image(pipe), refs["user"])
    pipe.unfuse_lora()
    close(image(pipe), refs["user"])
    pipe.unload_lora_weights()
    close(image(pipe), refs["none"])
    assert_weights_back(base, pipe, fused_targets=fused_user_targets())


def test_user_fuse_then_unload_erasure_keeps_the_fused_lora(erasure, user_lora, refs):
    """Regression: load_erasure, fuse_lora of another LoRA, unload_erasure dropped the fused LoRA."""
    _, path = erasure
    pipe = tiny_sd_pipeline()
    pipe.load_erasure(path, scale=SCALE, adapter_name="erase")
    pipe.load_lora_weights(str(user_lora), adapter_name="style")
    pipe.fuse_lora(adapter_names=["style"])
    pipe.unload_erasure("erase")
    close(image(pipe), refs["user"])
    differ(image(pipe), refs["none"])


def test_user_lora_fused_before_the_erasure(erasure, user_lora, refs):
    adapter, path = erasure
    pipe = tiny_sd_pipeline()
    base = snapshot(pipe)
    pipe.load_lora_weights(str(user_lora), adapter_name="style")
    pipe.fuse_lora()
    pipe.load_erasure(path, scale=SCALE, adapter_name="erase")
    assert pipe.unet.conv_in.merged_adapters == ["style"]  # still fused (peft unmerges when it adds an adapter)
    close(image(pipe), refs["both"])
    pipe.set_erasure_scale("erase", 0.3)
    close(image(pipe), refs["ref"](user=True, erase=True, scale=0.3))
    pipe.set_erasure_scale("erase", SCALE)
    pipe.unfuse_lora()
    close(image(pipe), refs["both"])
    pipe.unload_erasure()
    close(image(pipe), refs["user"])
    pipe.unload_lora_weights()
    close(image(pipe), refs["none"])
    assert_weights_back(base, pipe, fused_targets=fused_user_targets())


@pytest.mark.parametrize("first", ["erasure", "user"])
def test_user_lora_then_erasure_unloaded_in_either_order(first, erasure, user_lora, refs):
    _, path = erasure
    pipe = tiny_sd_pipeline()
    base = snapshot(pipe)
    pipe.load_lora_weights(str(user_lora), adapter_name="style")
    with_user = snapshot(pipe)
    pipe.load_erasure(path, scale=SCALE, adapter_name="erase")
    close(image(pipe), refs["both"])
    if first == "erasure":
        pipe.unload_erasure("erase")
        close(image(pipe), refs["user"])
        assert_weights_back(with_user, pipe)
        pipe.unload_lora_weights()
    else:
        pipe.unload_lora_weights()  # the user's LoRAs go, the erasure adapter stays
        assert pipe.active_erasures == {"erase": SCALE}
        close(image(pipe), refs["erase"])
        pipe.unload_erasure()
    close(image(pipe), refs["none"])
    assert_weights_back(base, pipe)  # nothing was fused: bit for bit


def test_erasure_alone_unloads_bit_for_bit_after_a_users_lora_came_and_went(erasure, user_lora, refs):
    _, path = erasure
    pipe = tiny_sd_pipeline()
    base = snapshot(pipe)
    pipe.load_erasure(path, scale=SCALE, adapter_name="erase")
    pipe.load_lora_weights(str(user_lora), adapter_name="style")
    pipe.delete_adapters("style")  # diffusers leaves the user's (now empty) peft wrappers in place
    close(image(pipe), refs["erase"])
    pipe.unload_erasure()
    close(image(pipe), refs["none"])
    pipe.unload_lora_weights()
    assert_weights_back(base, pipe)


# ---------------------------------------------------------------------------------------------
# set_adapters, fuse_lora, delete_adapters, disable_lora with an erasure LoRA
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_erasure(tmp_path_factory):
    adapter = erasure_adapter("lora", tiny_sd_pipeline)
    return adapter, save_adapter(adapter, tmp_path_factory.mktemp("erase_lora") / "erase.safetensors")


def test_set_adapters_naming_the_erasure_sets_its_scale(lora_erasure, user_lora):
    adapter, path = lora_erasure

    def ref(**kw):
        return reference(tiny_sd_pipeline, StableDiffusionPipeline, erase_path=path, **kw)

    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(str(user_lora), adapter_name="style")
    pipe.load_erasure(path, scale=SCALE, adapter_name="erase")
    pipe.set_adapters(["style", "erase"], [1.0, 0.3])
    assert pipe.active_erasures == {"erase": 0.3}
    close(image(pipe), ref(user=user_lora, erase=adapter, scale=0.3))
    with pytest.raises(AdapterError, match="one number"):
        pipe.set_adapters(["erase"], [{"unet": 1.0}])
    assert pipe.active_erasures == {"erase": 0.3}

    pipe.disable_lora()  # every LoRA off, as in diffusers
    close(image(pipe), ref())
    pipe.enable_lora()
    close(image(pipe), ref(user=user_lora, erase=adapter, scale=0.3))

    pipe.unet.set_adapters(["style"])  # a model's own set_adapters: the next pipeline call puts the erasure back
    close(image(pipe), ref(user=user_lora, erase=adapter, scale=0.3))


def test_requires_grad_flags_stay_the_users(lora_erasure, user_lora):
    # peft freezes a model's base weights when it injects an adapter, and set_adapters makes active adapters
    # trainable; neither may leak: a frozen flag changes half-precision images on the CPU (measured: SDXL fp16)
    _, path = lora_erasure
    pipe = tiny_sd_pipeline()
    pipe.unet.conv_in.weight.requires_grad_(False)
    flags = {(c, n): p.requires_grad for c in ("unet", "text_encoder")
             for n, p in getattr(pipe, c).named_parameters()}
    assert any(flags.values()) and not all(flags.values())

    def erasure_params():
        return [p for c in ("unet", "text_encoder") for n, p in getattr(pipe, c).named_parameters() if ".erase." in n]

    name = pipe.load_erasure(path, scale=SCALE, adapter_name="erase")
    assert erasure_params() and not any(p.requires_grad for p in erasure_params())
    assert all(p.requires_grad == flags[(c, n.replace(".base_layer", ""))] for c in ("unet", "text_encoder")
               for n, p in getattr(pipe, c).named_parameters() if ".erase." not in n)
    pipe.unload_erasure(name)
    assert {(c, n): p.requires_grad for c in ("unet", "text_encoder")
            for n, p in getattr(pipe, c).named_parameters()} == flags

    pipe.load_erasure(path, scale=SCALE, adapter_name="erase")
    pipe.load_lora_weights(str(user_lora), adapter_name="style")  # diffusers freezes base weights here, as it does
    pipe.set_adapters(["style", "erase"], [1.0, 0.5])
    assert not any(p.requires_grad for p in erasure_params())


def test_fuse_lora_never_fuses_an_erasure_lora(lora_erasure, user_lora):
    adapter, path = lora_erasure
    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(str(user_lora), adapter_name="style")
    pipe.load_erasure(path, scale=SCALE, adapter_name="erase")
    loaded = snapshot(pipe)
    with pytest.raises(AdapterError, match="erasure adapter 'erase' is not fused"):
        pipe.fuse_lora(adapter_names=["style", "erase"])
    assert pipe.fused_loras == set()
    assert_weights_back(loaded, pipe)

    pipe.fuse_lora(adapter_names=["style"], lora_scale=0.5)  # scales the user's LoRA, not the erasure adapter
    assert pipe.active_erasures == {"erase": SCALE}
    close(image(pipe), reference(tiny_sd_pipeline, StableDiffusionPipeline, user=user_lora, user_weight=0.5,
                                 erase=adapter, erase_path=path))
    pipe.delete_adapters("erase")  # = unload_erasure
    assert pipe.active_erasures == {} and "erase" not in pipe.get_list_adapters()["unet"]
    close(image(pipe), reference(tiny_sd_pipeline, StableDiffusionPipeline, user=user_lora, user_weight=0.5))


def test_names_are_checked_against_the_users_loras(lora_erasure, user_lora, tmp_path):
    adapter, path = lora_erasure
    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(str(user_lora), adapter_name="style")
    before = snapshot(pipe)
    with pytest.raises(AdapterError, match="already has a LoRA adapter named 'style'"):
        pipe.load_erasure(path, adapter_name="style")
    assert pipe.active_erasures == {}
    assert_weights_back(before, pipe)
    pipe.load_erasure(erasure_adapter("delta", tiny_sd_pipeline), adapter_name="merged")
    with pytest.raises(AdapterError, match="set_erasure_scale"):
        pipe.set_adapters(["style", "merged"])


def test_sdxl_erasure_lora_with_a_users_lora(tmp_path):
    user = write_user_lora(tmp_path / "user", StableDiffusionXLPipeline, tiny_sdxl_pipeline, with_text_encoder=False)
    adapter = erasure_adapter("lora", tiny_sdxl_pipeline, SDXL_ERASE_LORA)
    path = save_adapter(adapter, tmp_path / "erase.safetensors")

    def ref(**kw):
        return reference(tiny_sdxl_pipeline, StableDiffusionXLPipeline, erase_path=path, **kw)

    pipe = tiny_sdxl_pipeline()
    base = snapshot(pipe)
    pipe.load_erasure(path, scale=SCALE, adapter_name="erase")
    pipe.load_lora_weights(str(user), adapter_name="style")
    both = ref(user=user, erase=adapter)
    differ(both, ref(user=user))
    close(image(pipe), both)
    pipe.fuse_lora()
    close(image(pipe), both)
    pipe.unload_erasure()
    close(image(pipe), ref(user=user))
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    close(image(pipe), ref())
    assert_weights_back(base, pipe, fused_targets=USER_UNET_TARGETS)


# ---------------------------------------------------------------------------------------------
# per-prompt scales: registered by the method, found through the entry point
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "delta"])
def test_a_registered_prompt_scale_scales_the_adapter_for_the_call(kind, monkeypatch, tmp_path):
    monkeypatch.setattr(erasure_module, "_PROMPT_SCALES", {})
    seen = []

    def quarter(pipe, prompts, concepts):
        seen.append((list(prompts), list(concepts)))
        return 0.25

    erasure_module.register_prompt_scale("test-ft", quarter)
    adapter = erasure_adapter(kind, tiny_sd_pipeline)
    adapter.method, adapter.hyperparameters = "test-ft", {"facilitated_transport": True}
    path = save_adapter(adapter, tmp_path / "ft.safetensors")
    pipe = tiny_sd_pipeline()
    pipe.load_erasure(path, scale=SCALE, adapter_name="erase")
    loaded = snapshot(pipe)
    got = image(pipe)
    assert seen == [([PROMPT], ["circle"])]
    assert_weights_back(loaded, pipe)  # back to full scale after the call
    if kind == "lora":
        assert pipe.unet.conv_in.scaling["erase"] == pytest.approx(SCALE * 3.0 / 2)
    expected = reference(tiny_sd_pipeline, StableDiffusionPipeline, erase=adapter, erase_path=path,
                         scale=SCALE * 0.25)
    close(got, expected)
    pipe.unload_erasure()
    pipe.load_erasure(path, scale=SCALE, adapter_name="erase", facilitated_transport=False)
    close(image(pipe), reference(tiny_sd_pipeline, StableDiffusionPipeline, erase=adapter, erase_path=path))


def test_a_method_without_a_prompt_scale_is_refused(monkeypatch):
    monkeypatch.setattr(erasure_module, "_PROMPT_SCALES", {})
    pipe = tiny_sd_pipeline()
    before = snapshot(pipe)
    adapter = erasure_adapter("lora", tiny_sd_pipeline)
    adapter.method, adapter.hyperparameters = "no-such-method", {"facilitated_transport": True}
    with pytest.raises(AdapterError, match="no function is registered for method 'no-such-method'.*"
                                           "facilitated_transport=False"):
        pipe.load_erasure(adapter)
    assert pipe.active_erasures == {}
    assert_weights_back(before, pipe)
    pipe.load_erasure(adapter, facilitated_transport=False)


def test_spm_prompt_scale_comes_from_the_entry_point(monkeypatch):
    monkeypatch.setattr(erasure_module, "_PROMPT_SCALES", {})
    from unsee.erasure.spm import transport_strength

    assert erasure_module.prompt_scale("spm") is transport_strength


def test_spm_transport_without_importing_unsee_erasure(tmp_path):
    """A user who only imports the pipelines still gets SPM's Facilitated Transport (through the entry point)."""
    adapter = erasure_adapter("lora", tiny_sd_pipeline)
    adapter.method, adapter.hyperparameters = "spm", {"facilitated_transport": True}
    path = save_adapter(adapter, tmp_path / "spm.safetensors")
    script = f"""
import sys
from unsee.testing import tiny_sd_pipeline
pipe = tiny_sd_pipeline()
assert "unsee.erasure" not in sys.modules
pipe.load_erasure({str(path)!r})
from unsee.pipelines.erasure import _PROMPT_SCALES
from unsee.erasure.spm import transport_strength
assert _PROMPT_SCALES["spm"] is transport_strength
assert pipe._erasure_state().active["spm"].transport is transport_strength
print("ok")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# the format across releases
# ---------------------------------------------------------------------------------------------


def _previous_reader():
    path = ROOT / "tests" / "data" / "adapters_v0_1_0.py"
    spec = importlib.util.spec_from_file_location("unsee_adapters_v0_1_0", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_files_written_now_load_in_the_previous_release(tmp_path):
    old = _previous_reader()
    te = erasure_adapter("delta", tiny_sdxl_pipeline, [("text_encoder_2", "text_model.final_layer_norm.weight")])
    te.kind = "text_encoder"
    written = [erasure_adapter("lora", tiny_sd_pipeline), erasure_adapter("delta", tiny_sd_pipeline), te,
               erasure_adapter("lora", tiny_sdxl_pipeline, SDXL_ERASE_LORA)]
    written[0].hyperparameters = {"facilitated_transport": True, "rank": 2}
    written[0].training = {"steps": 3, "final_loss": 0.5}
    for i, adapter in enumerate(written):
        path = save_adapter(adapter, tmp_path / f"a{i}.safetensors")
        read = old.load_adapter(path)
        assert (read.kind, read.method, read.concepts) == (adapter.kind, adapter.method, adapter.concepts)
        assert (read.fingerprint, read.hyperparameters, read.training) == (
            adapter.fingerprint, adapter.hyperparameters, adapter.training)
        assert (read.rank, read.alpha) == (adapter.rank, adapter.alpha)
        assert read.tensors.keys() == adapter.tensors.keys()
        assert all(torch.equal(read.tensors[k], adapter.tensors[k]) for k in adapter.tensors)


def test_files_written_by_the_previous_release_load_now(tmp_path):
    examples = sorted((ROOT / "weights" / "examples").glob("*.safetensors"))
    assert examples
    old = _previous_reader()
    for path in examples:
        before, now = old.load_adapter(path), load_adapter(path)
        assert (now.kind, now.method, now.concepts, now.fingerprint) == (
            before.kind, before.method, before.concepts, before.fingerprint)
        assert all(torch.equal(now.tensors[k], before.tensors[k]) for k in before.tensors)
