"""Erasure adapter files: format, validation, applying/stacking/unloading, diffusers interop."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import struct  # noqa: E402

import pytest  # noqa: E402
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402

from unsee.adapters import (  # noqa: E402
    Adapter,
    AdapterError,
    component_fingerprint,
    fingerprint,
    load_adapter,
    save_adapter,
)
from unsee.erasure.adapter_builders import delta_adapter_from_weights, lora_adapter_from_peft  # noqa: E402
from conftest import bits, snapshot  # noqa: E402
from unsee.pipelines import erasure as erasure_module  # noqa: E402
from unsee.testing import tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402

SD_DELTA_PARAMS = [
    ("unet", "conv_in.weight"),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
    ("unet", "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v.weight"),
    ("unet", "time_embedding.linear_1.bias"),
    ("text_encoder", "encoder.layers.0.self_attn.q_proj.weight"),
    ("text_encoder", "final_layer_norm.weight"),
]
SD_LORA_MODULES = [
    ("unet", "conv_in"),  # Conv2d 3x3
    ("unet", "mid_block.attentions.0.proj_in"),  # Conv2d 1x1 in the SD-shaped tiny UNet
    ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"),  # Linear
    ("text_encoder", "encoder.layers.1.mlp.fc1"),
    ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
]
SDXL_LORA_MODULES = [
    ("unet", "down_blocks.1.attentions.0.proj_in"),  # Linear (use_linear_projection)
    ("unet", "down_blocks.0.resnets.0.conv1"),
    ("text_encoder", "encoder.layers.0.self_attn.out_proj"),
    ("text_encoder_2", "text_model.encoder.layers.1.self_attn.v_proj"),  # CLIPTextModelWithProjection keeps text_model.
]


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def assert_bit_identical(before, pipe):
    after = snapshot(pipe)
    assert set(after) == set(before)
    changed = [k for k in before
               if before[k].dtype != after[k].dtype or not torch.equal(bits(before[k]), bits(after[k]))]
    assert not changed, f"{len(changed)} tensors changed, e.g. {changed[:3]}"


def param(pipe, component, name):
    return dict(getattr(pipe, component).named_parameters())[name]


def effective(pipe, component, name):
    """The value a module computes with: the parameter, plus the active unfused peft LoRA deltas when peft wraps
    the module (LoRA erasure adapters are peft adapters; they change no weight)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    path, _, leaf = name.rpartition(".")
    module = getattr(pipe, component).get_submodule(path)
    if not isinstance(module, BaseTunerLayer):
        return getattr(module, leaf)
    value = getattr(module.get_base_layer(), leaf).detach().clone()
    if leaf == "weight" and not module.disable_adapters:
        for adapter in module.active_adapters:
            if adapter in module.lora_A and adapter not in module.merged_adapters:
                value += module.get_delta_weight(adapter)
    return value


def base_snapshot(pipe):
    """snapshot() without peft's LoRA tensors and with peft's base_layer level removed from names."""
    return {k.replace(".base_layer.", "."): v for k, v in snapshot(pipe).items() if ".lora_" not in k}


def make_delta(pipe, entries=SD_DELTA_PARAMS, seed=0, kind="delta", scale=0.1):
    g = torch.Generator().manual_seed(seed)
    tensors = {f"{c}.{n}": torch.randn(param(pipe, c, n).shape, generator=g) * scale for c, n in entries}
    components = sorted({c for c, _ in entries})
    return Adapter(kind=kind, method="esd-u", concepts=["circle"], tensors=tensors,
                   fingerprint=fingerprint(pipe, components), hyperparameters={"lr": 1e-5, "steps": 3},
                   training={"final_loss": 0.25})


def make_lora(pipe, modules=SD_LORA_MODULES, rank=2, alpha=3.0, seed=1, kind="lora"):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, path in modules:
        weight = dict(getattr(pipe, component).named_modules())[path].weight
        if weight.ndim == 2:
            a, b = (rank, weight.shape[1]), (weight.shape[0], rank)
        else:
            a, b = (rank, *weight.shape[1:]), (weight.shape[0], rank, 1, 1)
        tensors[f"{component}.{path}.lora_A.weight"] = torch.randn(a, generator=g) * 0.3
        tensors[f"{component}.{path}.lora_B.weight"] = torch.randn(b, generator=g) * 0.3
    components = sorted({c for c, _ in modules})
    return Adapter(kind=kind, method="spm", concepts=["circle", "star"], tensors=tensors,
                   fingerprint=fingerprint(pipe, components), rank=rank, alpha=alpha)


def lora_delta(adapter, component, path, shape):
    a = adapter.tensors[f"{component}.{path}.lora_A.weight"].flatten(1)
    b = adapter.tensors[f"{component}.{path}.lora_B.weight"].flatten(1)
    return (b @ a).reshape(shape) * (adapter.alpha / adapter.rank)


def header(path):
    with safetensors.safe_open(str(path), "pt") as handle:
        return handle.metadata()


def rewrite(path, tensors=None, metadata=None):
    """Write a safetensors file directly (bypassing save_adapter's validation)."""
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return path


def unet_inputs(pipe):
    g = torch.Generator().manual_seed(7)
    config = pipe.unet.config
    sample = torch.randn(1, 4, 8, 8, generator=g)  # small latents keep the forward pass cheap
    hidden = torch.randn(1, 8, config.cross_attention_dim, generator=g)
    kwargs = {}
    if config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 16, generator=g),
                                       "time_ids": torch.randn(1, 6, generator=g)}
    return (sample, 10, hidden), kwargs


@torch.no_grad()
def unet_out(pipe):
    args, kwargs = unet_inputs(pipe)
    return pipe.unet(*args, **kwargs).sample


@torch.no_grad()
def text_out(pipe, component):
    ids = torch.arange(3, 80).remainder(600).unsqueeze(0)
    return getattr(pipe, component)(ids)[0]


@pytest.fixture(scope="module")
def sd_base():
    return snapshot(tiny_sd_pipeline())


# ---------------------------------------------------------------------------------------------
# file format
# ---------------------------------------------------------------------------------------------


def test_delta_file_round_trip_and_header(tmp_path):
    pipe = tiny_sd_pipeline()
    adapter = make_delta(pipe)
    path = save_adapter(adapter, tmp_path / "circle.safetensors")
    meta = header(path)
    assert meta["format"] == "pt" and meta["unsee_format"] == "1" and meta["kind"] == "delta"
    assert meta["method"] == "esd-u" and json.loads(meta["concepts"]) == ["circle"]
    assert json.loads(meta["fingerprint"]) == fingerprint(pipe, ["unet", "text_encoder"])
    assert json.loads(meta["hyperparameters"]) == {"lr": 1e-5, "steps": 3}
    assert json.loads(meta["training"]) == {"final_loss": 0.25}
    assert "lora_adapter_metadata" not in meta

    loaded = load_adapter(path)
    assert (loaded.kind, loaded.method, loaded.concepts) == ("delta", "esd-u", ["circle"])
    assert loaded.components == ["unet", "text_encoder"]
    assert loaded.fingerprint == adapter.fingerprint and loaded.training == adapter.training
    assert set(loaded.tensors) == set(adapter.tensors)
    assert all(torch.equal(loaded.tensors[k], adapter.tensors[k]) for k in adapter.tensors)
    assert Adapter.load(path).tensors.keys() == adapter.tensors.keys()


def test_lora_header_carries_diffusers_config(tmp_path):
    pipe = tiny_sd_pipeline()
    adapter = make_lora(pipe, rank=2, alpha=3.0)
    path = adapter.save(tmp_path / "lora.safetensors")
    lora_meta = json.loads(header(path)["lora_adapter_metadata"])
    assert lora_meta["unet.r"] == 2 and lora_meta["unet.lora_alpha"] == 3.0
    assert lora_meta["text_encoder.r"] == 2 and lora_meta["text_encoder.lora_alpha"] == 3.0
    assert sorted(lora_meta["unet.target_modules"]) == sorted(p for c, p in SD_LORA_MODULES if c == "unet")
    loaded = load_adapter(path)
    assert (loaded.kind, loaded.rank, loaded.alpha) == ("lora", 2, 3.0)
    assert loaded.scaling == pytest.approx(1.5)


def test_fingerprint_depends_on_architecture_only():
    sd, sd_again, sdxl = tiny_sd_pipeline(seed=0), tiny_sd_pipeline(seed=5), tiny_sdxl_pipeline()
    fp = fingerprint(sd)
    assert set(fp) == {"unet", "text_encoder"} and all(len(v) == 16 for v in fp.values())
    assert fingerprint(sd_again) == fp  # other weight values
    with torch.no_grad():
        sd_again.unet.conv_in.weight.add_(1.0)
    assert fingerprint(sd_again) == fp
    assert component_fingerprint(sd.unet.to(torch.float16)) == fp["unet"]  # dtype does not matter
    assert fingerprint(sdxl)["unet"] != fp["unet"]
    assert set(fingerprint(sdxl)) == {"unet", "text_encoder", "text_encoder_2"}
    other = UNet2DConditionModel(**{**dict(sd.unet.config), "block_out_channels": (16, 48)})
    assert component_fingerprint(other) != fp["unet"]
    assert fingerprint(sd.unet, "unet") == {"unet": fp["unet"]}


# ---------------------------------------------------------------------------------------------
# applying, stacking, unloading
# ---------------------------------------------------------------------------------------------


def test_delta_apply_and_unload_is_bit_identical(tmp_path, sd_base):
    pipe = tiny_sd_pipeline()
    assert_bit_identical(sd_base, pipe)
    adapter = make_delta(pipe)
    path = save_adapter(adapter, tmp_path / "circle.safetensors")
    name = pipe.load_erasure(path)
    assert name == "circle" and pipe.active_erasures == {"circle": 1.0}
    for component, pname in SD_DELTA_PARAMS:
        expected = sd_base[f"{component}.{pname}"] + adapter.tensors[f"{component}.{pname}"]
        assert torch.equal(param(pipe, component, pname), expected), pname
    untouched = param(pipe, "unet", "conv_out.weight")
    assert torch.equal(untouched, sd_base["unet.conv_out.weight"])
    assert not torch.allclose(unet_out(pipe), unet_out(tiny_sd_pipeline()))
    pipe.unload_erasure()
    assert pipe.active_erasures == {}
    assert_bit_identical(sd_base, pipe)


def test_two_adapters_stack_with_their_scales(tmp_path, sd_base):
    pipe = tiny_sd_pipeline()
    delta = make_delta(pipe)
    lora = make_lora(pipe)
    save_adapter(lora, tmp_path / "lora.safetensors")
    a = pipe.load_erasure(delta, scale=0.7, adapter_name="d")
    b = pipe.load_erasure(tmp_path / "lora.safetensors", scale=-0.5)
    assert (a, b) == ("d", "lora") and pipe.active_erasures == {"d": 0.7, "lora": -0.5}

    def expected(scale_d, scale_l):
        out = {}
        for component, pname in SD_DELTA_PARAMS:
            out[(component, pname)] = sd_base[f"{component}.{pname}"] + scale_d * delta.tensors[f"{component}.{pname}"]
        for component, path in SD_LORA_MODULES:
            key = (component, f"{path}.weight")
            base = out.get(key, sd_base[f"{component}.{path}.weight"])
            out[key] = base + scale_l * lora_delta(lora, component, path, base.shape)
        return out

    # conv_in is touched by both adapters
    assert ("unet", "conv_in.weight") in dict.fromkeys(expected(1, 1))
    for (component, pname), value in expected(0.7, -0.5).items():
        torch.testing.assert_close(effective(pipe, component, pname), value, rtol=0, atol=1e-6)

    pipe.set_erasure_scale("d", 0.0)
    pipe.set_erasure_scale("lora", 2.0)
    for (component, pname), value in expected(0.0, 2.0).items():
        torch.testing.assert_close(effective(pipe, component, pname), value, rtol=0, atol=1e-6)
    pipe.unload_erasure("lora")
    assert pipe.active_erasures == {"d": 0.0}
    assert_bit_identical(sd_base, pipe)  # the remaining adapter has scale 0
    pipe.set_erasure_scale("d", 1.0)
    pipe.load_erasure(lora, adapter_name="again")
    pipe.unload_erasure()
    assert_bit_identical(sd_base, pipe)


def test_scale_changes_do_not_drift(sd_base):
    pipe = tiny_sd_pipeline()
    adapter = make_delta(pipe)
    pipe.load_erasure(adapter, adapter_name="x")
    reference = snapshot(pipe)
    for tensor in adapter.tensors.values():  # the pipeline keeps its own copy of the adapter
        tensor.mul_(100.0)
    for scale in (0.3, -1.7, 5.0, 0.0, 1e-3, 1.0):
        pipe.set_erasure_scale("x", scale)
    assert_bit_identical(reference, pipe)
    pipe.unload_erasure("x")
    assert_bit_identical(sd_base, pipe)


def test_scale_zero_equals_base_model(sd_base):
    pipe = tiny_sd_pipeline()
    before = unet_out(pipe)
    lora, delta = make_lora(pipe), make_delta(pipe)  # built before peft wraps conv_in
    pipe.load_erasure(lora, scale=0.0)
    pipe.load_erasure(delta, scale=0)
    assert base_snapshot(pipe).keys() == sd_base.keys()  # the LoRA is a peft adapter: its layers wrap modules
    assert all(torch.equal(bits(v), bits(sd_base[k])) for k, v in base_snapshot(pipe).items())
    assert torch.equal(unet_out(pipe), before)
    pipe.unload_erasure()
    assert_bit_identical(sd_base, pipe)


def test_half_precision_parameters_keep_their_dtype():
    pipe = tiny_sd_pipeline().to(dtype=torch.float16)
    base = snapshot(pipe)
    adapter = make_delta(pipe)
    pipe.load_erasure(adapter)
    for component, pname in SD_DELTA_PARAMS:
        value = param(pipe, component, pname)
        assert value.dtype == torch.float16
        expected = (base[f"{component}.{pname}"].float() + adapter.tensors[f"{component}.{pname}"]).half()
        assert torch.equal(value, expected)
    pipe.unload_erasure()
    assert_bit_identical(base, pipe)


def test_names_and_unknown_names(tmp_path):
    pipe = tiny_sd_pipeline()
    adapter = make_delta(pipe)
    assert pipe.load_erasure(adapter) == "esd-u-circle"
    with pytest.raises(AdapterError, match="already loaded"):
        pipe.load_erasure(adapter)
    with pytest.raises(AdapterError, match="no erasure adapter named 'nope'"):
        pipe.unload_erasure("nope")
    with pytest.raises(AdapterError, match="no erasure adapter named"):
        pipe.set_erasure_scale("nope", 1.0)
    with pytest.raises(AdapterError, match="finite"):
        pipe.set_erasure_scale("esd-u-circle", float("nan"))
    assert pipe.active_erasures == {"esd-u-circle": 1.0}


def test_rollback_when_applying_fails_midway(monkeypatch, sd_base):
    pipe = tiny_sd_pipeline()
    pipe.load_erasure(make_delta(pipe, seed=3), scale=0.5, adapter_name="first")
    with_first = snapshot(pipe)
    calls = {"n": 0}
    real = erasure_module._Term.value

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated failure while writing weights")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(erasure_module._Term, "value", flaky)
    with pytest.raises(RuntimeError, match="simulated"):  # merged: the 4th call comes after a weight was written
        pipe.load_erasure(make_delta(pipe, seed=5), adapter_name="second")
    monkeypatch.setattr(erasure_module._Term, "value", real)
    assert calls["n"] >= 4
    assert pipe.active_erasures == {"first": 0.5}
    assert_bit_identical(with_first, pipe)
    pipe.unload_erasure()
    assert_bit_identical(sd_base, pipe)


def test_rollback_when_loading_a_lora_fails_midway(monkeypatch, sd_base):
    pipe = tiny_sd_pipeline()
    pipe.load_erasure(make_delta(pipe, seed=3), scale=0.5, adapter_name="first")
    with_first = snapshot(pipe)
    real = type(pipe).load_lora_into_text_encoder

    def fails(*args, **kwargs):  # after the UNet's LoRA layers are in
        assert pipe.unet.peft_config
        raise RuntimeError("simulated failure while loading the text encoder's LoRA")

    monkeypatch.setattr(type(pipe), "load_lora_into_text_encoder", fails)
    with pytest.raises(RuntimeError, match="simulated"):
        pipe.load_erasure(make_lora(pipe), adapter_name="second")
    monkeypatch.setattr(type(pipe), "load_lora_into_text_encoder", real)
    assert pipe.active_erasures == {"first": 0.5}
    assert not getattr(pipe.unet, "peft_config", None)
    assert_bit_identical(with_first, pipe)
    pipe.load_erasure(make_lora(pipe), adapter_name="second")  # the name is free again
    pipe.unload_erasure()
    assert_bit_identical(sd_base, pipe)


# ---------------------------------------------------------------------------------------------
# bad files and bad adapters: AdapterError, weights untouched
# ---------------------------------------------------------------------------------------------


def _good_file(pipe, folder):
    return save_adapter(make_delta(pipe), folder / "good.safetensors")


def _truncated(pipe, folder):
    data = _good_file(pipe, folder).read_bytes()
    path = folder / "truncated.safetensors"
    path.write_bytes(data[: len(data) - 100])
    return path


def _garbage_header(pipe, folder):
    path = folder / "garbage.safetensors"
    body = b"this is not json at all!"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 16)
    return path


def _tiny_file(pipe, folder):
    path = folder / "tiny.safetensors"
    path.write_bytes(b"abc")
    return path


def _pickle(pipe, folder):
    path = folder / "pickled.safetensors"
    torch.save(make_delta(pipe).tensors, path)
    return path


def _with_value(value):
    def build(pipe, folder):
        good = _good_file(pipe, folder)
        tensors = safetensors.torch.load_file(str(good))
        key = sorted(tensors)[-1]
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[3] = value
        return rewrite(folder / "bad_value.safetensors", tensors, header(good))
    return build


def _plain_safetensors(pipe, folder):
    return rewrite(folder / "plain.safetensors", make_lora(pipe).tensors, {"format": "pt"})


def _metadata_edit(**changes):
    def build(pipe, folder):
        good = _good_file(pipe, folder)
        meta = {**header(good), **changes}
        meta = {k: v for k, v in meta.items() if v is not None}
        return rewrite(folder / "edited.safetensors", safetensors.torch.load_file(str(good)), meta)
    return build


def _int_tensor(pipe, folder):
    good = _good_file(pipe, folder)
    tensors = safetensors.torch.load_file(str(good))
    key = sorted(tensors)[0]
    tensors[key] = torch.zeros(tensors[key].shape, dtype=torch.int32)
    return rewrite(folder / "int.safetensors", tensors, header(good))


def _unpaired_lora(pipe, folder):
    good = save_adapter(make_lora(pipe), folder / "lora.safetensors")
    tensors = safetensors.torch.load_file(str(good))
    del tensors[sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]]
    return rewrite(folder / "unpaired.safetensors", tensors, header(good))


def _lora_rank_mismatch(pipe, folder):
    good = save_adapter(make_lora(pipe, rank=2), folder / "lora.safetensors")
    meta = header(good)
    lora_meta = json.loads(meta["lora_adapter_metadata"])
    lora_meta.update({"unet.r": 3, "text_encoder.r": 3})
    meta["lora_adapter_metadata"] = json.dumps(lora_meta)
    return rewrite(folder / "rank.safetensors", safetensors.torch.load_file(str(good)), meta)


BAD_FILES = {
    "missing": (lambda pipe, folder: folder / "missing.safetensors", "does not exist"),
    "truncated": (_truncated, "truncated"),
    "garbage header": (_garbage_header, "not JSON"),
    "too short": (_tiny_file, "only 3 bytes"),
    "pickle renamed": (_pickle, "pickled torch checkpoint"),
    "nan": (_with_value(float("nan")), "NaN or inf"),
    "inf": (_with_value(float("inf")), "NaN or inf"),
    "-inf": (_with_value(float("-inf")), "NaN or inf"),
    "no unsee metadata": (_plain_safetensors, "without unsee adapter metadata.*load_lora_weights"),
    "future format": (_metadata_edit(unsee_format="99"), "format '99'"),
    "unknown kind": (_metadata_edit(kind="hypernetwork"), "unknown adapter kind"),
    "bad json": (_metadata_edit(concepts="[circle"), "'concepts' is not valid JSON"),
    "json of wrong type": (_metadata_edit(training="[1, 2]"), "'training' must be a JSON dict"),
    "missing method": (_metadata_edit(method=None), "lacks method"),
    "integer tensor": (_int_tensor, "floating point"),
    "lora key in delta": (_metadata_edit(kind="lora"), "not a diffusers/peft LoRA name"),
    "unpaired lora": (_unpaired_lora, "has no lora_B"),
    "lora rank vs header": (_lora_rank_mismatch, "header's LoRA rank is 3 but the lora_A/lora_B tensors have rank 2"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_raises_and_leaves_weights_alone(case, tmp_path, sd_base):
    build, message = BAD_FILES[case]
    pipe = tiny_sd_pipeline()
    path = build(pipe, tmp_path)
    with pytest.raises(AdapterError, match=message):
        load_adapter(path)
    with pytest.raises(AdapterError, match=message):
        pipe.load_erasure(path)
    assert pipe.active_erasures == {}
    assert_bit_identical(sd_base, pipe)


def _missing_key(pipe):
    adapter = make_delta(pipe)
    adapter.tensors["unet.zzz_not_a_layer.weight"] = torch.zeros(3)
    return adapter


def _wrong_shape(pipe):
    adapter = make_delta(pipe)
    adapter.tensors["unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v.weight"] = torch.zeros(4, 4)
    return adapter


def _lora_wrong_shape(pipe):
    adapter = make_lora(pipe)
    adapter.tensors["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"] = torch.zeros(2, 7)
    return adapter


def _lora_missing_module(pipe):
    adapter = make_lora(pipe)
    adapter.tensors["unet.zzz.to_q.lora_A.weight"] = torch.zeros(2, 4)
    adapter.tensors["unet.zzz.to_q.lora_B.weight"] = torch.zeros(4, 2)
    return adapter


def _lora_on_norm(pipe):
    adapter = make_lora(pipe)
    adapter.tensors["unet.mid_block.attentions.0.norm.lora_A.weight"] = torch.zeros(2, 32)
    adapter.tensors["unet.mid_block.attentions.0.norm.lora_B.weight"] = torch.zeros(32, 2)
    return adapter


def _sdxl_adapter(pipe):
    sdxl = tiny_sdxl_pipeline()
    return make_delta(sdxl, [("unet", "conv_in.weight"), ("unet", "time_embedding.linear_1.weight")])


def _other_block_sizes(pipe):
    config = {**dict(pipe.unet.config), "block_out_channels": (16, 48)}

    class Holder:
        unet = UNet2DConditionModel(**config)

    return make_delta(Holder(), [("unet", "conv_in.weight")])


def _text_encoder_2_on_sd(pipe):
    sdxl = tiny_sdxl_pipeline()
    return make_delta(sdxl, [("text_encoder_2", "text_projection.weight")], kind="text_encoder")


def _nan_in_memory(pipe):
    adapter = make_delta(pipe)
    adapter.tensors["unet.conv_in.weight"][0, 0, 0, 0] = float("nan")
    return adapter


def _no_fingerprint(pipe):
    adapter = make_delta(pipe)
    adapter.fingerprint = {"unet": adapter.fingerprint["unet"]}
    return adapter


MISMATCHES = {
    "key the model lacks": (_missing_key, "has no parameter 'zzz_not_a_layer.weight'"),
    "wrong delta shape": (_wrong_shape, r"shape \(4, 4\)"),
    "lora shape": (_lora_wrong_shape, "do not fit a Linear"),
    "lora module missing": (_lora_missing_module, "does not exist"),
    "lora on a norm layer": (_lora_on_norm, "GroupNorm"),
    "sdxl adapter on sd": (_sdxl_adapter, "trained for another architecture"),
    "other block sizes": (_other_block_sizes, "trained for another architecture"),
    "component the pipe lacks": (_text_encoder_2_on_sd, "has no text_encoder_2"),
    "nan in memory": (_nan_in_memory, "NaN or inf"),
    "missing fingerprint": (_no_fingerprint, "no architecture fingerprint for text_encoder"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_adapter_that_does_not_fit_raises_and_leaves_weights_alone(case, tmp_path, sd_base):
    build, message = MISMATCHES[case]
    pipe = tiny_sd_pipeline()
    pipe.load_erasure(make_delta(pipe, seed=9), adapter_name="already")
    with_one = snapshot(pipe)
    adapter = build(pipe)
    with pytest.raises(AdapterError, match=message):
        pipe.load_erasure(adapter, adapter_name="bad")
    assert pipe.active_erasures == {"already": 1.0}
    assert_bit_identical(with_one, pipe)
    pipe.unload_erasure()
    assert_bit_identical(sd_base, pipe)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "1.0", None])
def test_bad_scale_raises(scale, sd_base):
    pipe = tiny_sd_pipeline()
    with pytest.raises(AdapterError, match="scale"):
        pipe.load_erasure(make_delta(pipe), scale=scale)
    assert pipe.active_erasures == {}
    assert_bit_identical(sd_base, pipe)


def test_save_refuses_invalid_adapters(tmp_path):
    pipe = tiny_sd_pipeline()
    bad_kind = make_delta(pipe, [("unet", "conv_in.weight")], kind="text_encoder")
    with pytest.raises(AdapterError, match="only touch the text encoders"):
        save_adapter(bad_kind, tmp_path / "a.safetensors")
    with pytest.raises(AdapterError, match="NaN or inf"):
        save_adapter(_nan_in_memory(pipe), tmp_path / "b.safetensors")
    with pytest.raises(AdapterError, match="end in .safetensors"):
        save_adapter(make_delta(pipe), tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# atomic save
# ---------------------------------------------------------------------------------------------


def test_save_is_atomic(tmp_path, monkeypatch):
    pipe = tiny_sd_pipeline()
    adapter = make_delta(pipe)
    target = tmp_path / "out" / "adapter.safetensors"
    real_save = safetensors.torch.save_file

    def crash_midway(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:  # leave a partial file behind, then fail
            handle.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with pytest.raises(OSError, match="simulated"):
        save_adapter(adapter, target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []

    # an existing adapter survives a failed overwrite untouched
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    save_adapter(adapter, target)
    before = target.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with pytest.raises(OSError):
        save_adapter(make_delta(pipe, seed=4), target)
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["adapter.safetensors"]
    assert load_adapter(target).method == "esd-u"


def test_saved_files_get_the_permissions_of_a_plain_write(tmp_path):
    """The temporary file of an atomic write is private (mkstemp); the saved file must not stay so."""
    old = os.umask(0o022)
    try:
        path = save_adapter(make_delta(tiny_sd_pipeline()), tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------
# diffusers interop, SDXL, trainer helpers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build, plain_class, modules", [
    (tiny_sd_pipeline, StableDiffusionPipeline, SD_LORA_MODULES),
    (tiny_sdxl_pipeline, StableDiffusionXLPipeline, SDXL_LORA_MODULES),
], ids=["sd", "sdxl"])
def test_lora_file_loads_in_plain_diffusers_and_matches(build, plain_class, modules, tmp_path):
    ours = build()
    adapter = make_lora(ours, modules, rank=2, alpha=5.0)  # scaling 2.5: only right if alpha is honoured
    path = save_adapter(adapter, tmp_path / "erase.safetensors")
    base_unet = unet_out(ours)
    ours.load_erasure(path)

    plain = build(plain_class)
    plain.load_lora_weights(str(path))
    assert type(plain.unet.conv_in if ("unet", "conv_in") in modules else plain.unet.down_blocks[0].resnets[0].conv1
                ).__module__.startswith("peft")
    got, expected = unet_out(plain), unet_out(ours)
    assert (expected - base_unet).abs().max() > 1e-2  # the LoRA does change the output
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for component in sorted({c for c, _ in modules if c != "unet"}):
        torch.testing.assert_close(text_out(plain, component), text_out(ours, component), rtol=0, atol=1e-5)

    # without diffusers' header config, load_lora_weights would assume alpha == rank
    stripped = rewrite(tmp_path / "stripped.safetensors", adapter.tensors, {"format": "pt"})
    other = build(plain_class)
    other.load_lora_weights(str(stripped))
    assert (unet_out(other) - expected).abs().max() > 1e-3


def test_unsee_adapter_on_top_of_a_diffusers_lora(tmp_path):
    pipe = tiny_sd_pipeline()
    lora_path = save_adapter(make_lora(pipe), tmp_path / "lora.safetensors")
    pipe.load_lora_weights(str(lora_path), adapter_name="style")  # wraps conv_in and others with peft
    base = snapshot(pipe)
    delta = make_delta(tiny_sd_pipeline(), [("unet", "conv_in.weight"), ("unet", "conv_out.weight")])
    assert delta.fingerprint["unet"] == component_fingerprint(pipe.unet)  # peft's wrappers are not architecture
    pipe.load_erasure(delta)
    wrapped = pipe.unet.conv_in.base_layer.weight
    assert torch.equal(wrapped, base["unet.conv_in.base_layer.weight"] + delta.tensors["unet.conv_in.weight"])
    pipe.unload_erasure()
    assert_bit_identical(base, pipe)


def test_sdxl_delta_and_text_encoder_adapters(tmp_path):
    pipe = tiny_sdxl_pipeline()
    base = snapshot(pipe)
    unet_delta = make_delta(pipe, [("unet", "add_embedding.linear_1.weight"), ("unet", "conv_in.weight")])
    te = make_delta(pipe, [("text_encoder_2", "text_model.encoder.layers.0.mlp.fc2.weight"),
                           ("text_encoder", "encoder.layers.1.self_attn.k_proj.weight")], kind="text_encoder")
    te_lora = make_lora(pipe, [("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj")], kind="text_encoder")
    save_adapter(te, tmp_path / "advunlearn.safetensors")
    save_adapter(te_lora, tmp_path / "advunlearn_lora.safetensors")
    loaded = load_adapter(tmp_path / "advunlearn.safetensors")
    assert loaded.kind == "text_encoder" and not loaded.is_lora
    assert loaded.components == ["text_encoder", "text_encoder_2"]
    assert load_adapter(tmp_path / "advunlearn_lora.safetensors").is_lora

    pipe.load_erasure(unet_delta, scale=0.5)
    pipe.load_erasure(tmp_path / "advunlearn.safetensors")
    pipe.load_erasure(tmp_path / "advunlearn_lora.safetensors", scale=2.0)
    key = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    expected = base[f"text_encoder_2.{key}"] + 2.0 * lora_delta(
        te_lora, "text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj", (16, 16))
    torch.testing.assert_close(param(pipe, "text_encoder_2", key), expected, rtol=0, atol=1e-6)
    assert torch.equal(param(pipe, "unet", "conv_in.weight"),
                       base["unet.conv_in.weight"] + 0.5 * unet_delta.tensors["unet.conv_in.weight"])
    assert len(pipe.active_erasures) == 3
    pipe.unload_erasure()
    assert_bit_identical(base, pipe)

    sd = tiny_sd_pipeline()
    sd_base = snapshot(sd)
    with pytest.raises(AdapterError, match="another architecture|has no text_encoder_2"):
        sd.load_erasure(tmp_path / "advunlearn.safetensors")
    assert_bit_identical(sd_base, sd)


def test_delta_adapter_from_weights(tmp_path, sd_base):
    pipe = tiny_sd_pipeline()
    names = ["conv_in.weight", "conv_out.weight", "conv_out.bias"]
    original = {n: param(pipe, "unet", n).detach().clone() for n in names}
    trained = {n: v.clone() for n, v in original.items()}
    trained["conv_in.weight"] += 0.25
    trained["conv_out.bias"] -= 1.0
    adapter = delta_adapter_from_weights(original, trained, "unet", method="salun", concepts=["star"], model=pipe,
                                         hyperparameters={"sparsity": 0.5})
    assert adapter.kind == "delta" and sorted(adapter.tensors) == ["unet.conv_in.weight", "unet.conv_out.bias"]
    assert adapter.fingerprint == {"unet": fingerprint(pipe)["unet"]}
    pipe.load_erasure(save_adapter(adapter, tmp_path / "salun.safetensors"))
    for name in names:
        torch.testing.assert_close(param(pipe, "unet", name), trained[name], rtol=0, atol=1e-6)
    pipe.unload_erasure()
    assert_bit_identical(sd_base, pipe)

    te = delta_adapter_from_weights({"final_layer_norm.bias": torch.zeros(16)},
                                    {"final_layer_norm.bias": torch.ones(16)}, "text_encoder",
                                    method="advunlearn", model=pipe.text_encoder)
    assert te.kind == "text_encoder" and te.fingerprint == {"text_encoder": fingerprint(pipe)["text_encoder"]}
    with pytest.raises(AdapterError, match="model= .* or fingerprint="):
        delta_adapter_from_weights(original, trained, method="x")


def test_lora_adapter_from_peft_matches_the_peft_model(tmp_path, sd_base):
    from peft import LoraConfig

    trained = tiny_sd_pipeline()
    trained.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "conv1"],
                                        init_lora_weights=False))
    assert component_fingerprint(trained.unet) == fingerprint(tiny_sd_pipeline())["unet"]
    expected = unet_out(trained)
    adapter = lora_adapter_from_peft(trained.unet, "unet", method="esd-x", concepts=["circle"])
    assert (adapter.rank, adapter.alpha, adapter.scaling) == (2, 4.0, 2.0)
    path = save_adapter(adapter, tmp_path / "peft.safetensors")

    fresh = tiny_sd_pipeline()
    fresh.load_erasure(path)
    torch.testing.assert_close(unet_out(fresh), expected, rtol=0, atol=1e-5)
    fresh.unload_erasure()
    assert_bit_identical(sd_base, fresh)
