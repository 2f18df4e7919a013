"""Single-file checkpoints (issue 26 item 3): ``save_single_file`` for SD 1.x, SD 2.x (OpenCLIP text encoder) and
SDXL in the original layouts, read back by diffusers' ``from_single_file`` bit for bit; the layouts detected by
diffusers as the right model type at real sizes; adapters merged into the file (``unsee export --format
checkpoint``).

Round trips load with a config folder that holds configs only (every weight file removed), so that every weight
compared comes from the single file.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders import single_file_utils  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

import unsee  # noqa: E402
from unsee import load_pipeline  # noqa: E402
from unsee.adapter_export import export_adapter  # noqa: E402
from unsee.adapters import Adapter, AdapterError, fingerprint, save_adapter  # noqa: E402
from unsee.cli import main  # noqa: E402
from unsee.convert import checkpoint_layout, export_checkpoint, save_single_file, single_file_state_dict  # noqa: E402
from unsee.pipelines import UnseeStableDiffusionPipeline, UnseeStableDiffusionXLPipeline  # noqa: E402
from unsee.testing import (  # noqa: E402
    SD15_UNET_CONFIG,
    SDXL_UNET_CONFIG,
    tiny_sd2_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
CALL = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np")


def tiny_sdxl(**kwargs):
    # SDXL's encoders differ in width (768 vs 1280) and diffusers' loader tells them apart by it: same here
    return tiny_sdxl_pipeline(text_encoder_2_size=24, **kwargs)


BUILDS = {"sd1": (tiny_sd_pipeline, StableDiffusionPipeline, UnseeStableDiffusionPipeline),
          "sd2": (tiny_sd2_pipeline, StableDiffusionPipeline, UnseeStableDiffusionPipeline),
          "sdxl": (tiny_sdxl, StableDiffusionXLPipeline, UnseeStableDiffusionXLPipeline)}


def config_folder(pipe, folder):
    """The pipeline's configs, tokenizers and scheduler without a single weight file."""
    pipe.save_pretrained(folder)
    weights = [p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin")]
    assert weights
    for path in weights:
        path.unlink()
    return folder


def assert_same_weights(expected_pipe, got_pipe):
    for name in COMPONENTS:
        expected = getattr(expected_pipe, name, None)
        if expected is None:
            assert getattr(got_pipe, name, None) is None
            continue
        want, got = expected.state_dict(), getattr(got_pipe, name).state_dict()
        assert set(got) == set(want), name
        different = [k for k in want if not torch.equal(got[k], want[k])]
        assert not different, (name, different[:3])


def keys_of(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def image(pipe, seed=0):
    return pipe("a red circle", generator=torch.Generator().manual_seed(seed), **CALL).images


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(BUILDS))
def test_diffusers_reads_the_file_back_bit_for_bit(arch, tmp_path):
    build, theirs, ours = BUILDS[arch]
    source = build()
    folder = config_folder(source, tmp_path / "config")
    path = save_single_file(source, tmp_path / f"{arch}.safetensors")
    assert checkpoint_layout(source) == arch
    plain = theirs.from_single_file(str(path), config=str(folder))
    assert_same_weights(source, plain)
    loaded = load_pipeline(path, config=folder)  # unsee's loader picks the SDXL class from the file's keys
    assert type(loaded) is ours
    assert_same_weights(source, loaded)
    a, b = image(source), image(loaded)
    assert a.std() > 0 and np.array_equal(a, b)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_layout_keys_are_the_original_ones(tmp_path):
    sd1 = keys_of(save_single_file(tiny_sd_pipeline(), tmp_path / "sd1.safetensors"))
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in sd1
    assert not any(k.startswith(("cond_stage_model.model.", "conditioner.")) for k in sd1)

    sd2_pipe = tiny_sd2_pipeline()
    sd2 = keys_of(save_single_file(sd2_pipe, tmp_path / "sd2.safetensors"))
    text = {k[len("cond_stage_model.model."):]: v for k, v in sd2.items() if k.startswith("cond_stage_model.model.")}
    assert not any(k.startswith("cond_stage_model.transformer.") for k in sd2)
    layers = sd2_pipe.text_encoder.config.num_hidden_layers
    block = {"attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias", "ln_1.weight",
             "ln_1.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
             "mlp.c_proj.bias"}
    expected = {f"transformer.resblocks.{i}.{k}" for i in range(layers) for k in block}
    expected |= {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias"}
    assert set(text) == expected
    te = sd2_pipe.text_encoder.state_dict()
    attention = "encoder.layers.1.self_attn."
    assert torch.equal(text["transformer.resblocks.1.attn.in_proj_weight"],
                       torch.cat([te[attention + p + "_proj.weight"] for p in "qkv"]))
    assert torch.equal(text["positional_embedding"], te["embeddings.position_embedding.weight"])

    xl_pipe = tiny_sdxl()
    xl = keys_of(save_single_file(xl_pipe, tmp_path / "xl.safetensors"))
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in xl
    assert "model.diffusion_model.label_emb.0.0.weight" in xl
    assert not any(k.startswith("cond_stage_model.") for k in xl)
    projection = xl_pipe.text_encoder_2.text_projection.weight
    assert torch.equal(xl["conditioner.embedders.1.model.text_projection"], projection.T)
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_bias" in xl


def _text_encoder(width, layers, act, projection=False):
    config = CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                            num_attention_heads=width // 64, hidden_act=act, projection_dim=width)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def test_diffusers_detects_the_model_type_at_real_sizes():
    """At SD 1.5 / SD 2.1 / SDXL sizes (built on the meta device, nothing allocated), diffusers' own detection reads
    our layout as the right model: what it uses to pick the architecture when no config folder is passed."""
    with torch.device("meta"):
        vae = AutoencoderKL()
        sd1 = SimpleNamespace(unet=UNet2DConditionModel(**SD15_UNET_CONFIG), vae=vae,
                              text_encoder=_text_encoder(768, 12, "quick_gelu"))
        sd2_unet = {**SD15_UNET_CONFIG, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
                    "use_linear_projection": True}
        sd2 = SimpleNamespace(unet=UNet2DConditionModel(**sd2_unet), vae=vae,
                              text_encoder=_text_encoder(1024, 23, "gelu"))
        xl = SimpleNamespace(unet=UNet2DConditionModel(**SDXL_UNET_CONFIG), vae=vae,
                             text_encoder=_text_encoder(768, 12, "quick_gelu"),
                             text_encoder_2=_text_encoder(1280, 32, "gelu", projection=True))
    detected = {}
    for name, pipe in (("sd1", sd1), ("sd2", sd2), ("sdxl", xl)):
        state = single_file_state_dict(pipe)
        detected[name] = single_file_utils.infer_diffusers_model_type(state)
        if name == "sd2":
            assert single_file_utils.is_open_clip_model(state) and not single_file_utils.is_clip_model(state)
            assert state["cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight"].shape == (3072, 1024)
            assert state["cond_stage_model.model.positional_embedding"].shape == (77, 1024)
        if name == "sdxl":
            assert single_file_utils.is_clip_sdxl_model(state) and single_file_utils.is_open_clip_sdxl_model(state)
            assert state["conditioner.embedders.1.model.text_projection"].shape == (1280, 1280)
        if name == "sd1":
            assert single_file_utils.is_clip_model(state)
    assert detected == {"sd1": "v1", "sd2": "v2", "sdxl": "xl_base"}


def test_refiner_shaped_pipeline_is_refused(tmp_path):
    pipe = tiny_sdxl()
    pipe.text_encoder = None
    with pytest.raises(NotImplementedError, match="refiner"):
        save_single_file(pipe, tmp_path / "r.safetensors")
    assert not (tmp_path / "r.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# adapters merged into the file
# ---------------------------------------------------------------------------------------------

RANK, ALPHA = 3, 5.0


def lora_adapter(pipe, modules, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, path in modules:
        w = getattr(pipe, component).get_submodule(path).weight
        a, b = ((RANK, w.shape[1]), (w.shape[0], RANK)) if w.ndim == 2 else \
            ((RANK, *w.shape[1:]), (w.shape[0], RANK, 1, 1))
        tensors[f"{component}.{path}.lora_A.weight"] = torch.randn(a, generator=g) * 0.3
        tensors[f"{component}.{path}.lora_B.weight"] = torch.randn(b, generator=g) * 0.3
    components = sorted({k.split(".", 1)[0] for k in tensors})
    return Adapter(kind="lora", method="esd-x", concepts=["circle"], tensors=tensors,
                   fingerprint=fingerprint(pipe, components), rank=RANK, alpha=ALPHA)


def delta_adapter(pipe, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {f"{c}.{n}": torch.randn(dict(getattr(pipe, c).named_parameters())[n].shape, generator=g) * 0.05
               for c, n in names}
    components = sorted({k.split(".", 1)[0] for k in tensors})
    return Adapter(kind="delta", method="esd-u", concepts=["circle"], tensors=tensors,
                   fingerprint=fingerprint(pipe, components))


SDXL_LORA = [("unet", "conv_in"), ("unet", "add_embedding.linear_1"),
             ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
             ("text_encoder", "encoder.layers.0.self_attn.q_proj"),
             ("text_encoder_2", "text_model.encoder.layers.1.self_attn.v_proj"), ("text_encoder_2", "text_projection")]


def test_lora_is_merged_at_its_scale_and_the_pipeline_is_untouched(tmp_path):
    pipe = tiny_sdxl()
    originals = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()}
                 for c in ("unet", "text_encoder", "text_encoder_2")}
    adapter = lora_adapter(pipe, SDXL_LORA)
    folder = config_folder(pipe, tmp_path / "config")
    pipe.load_erasure(adapter, scale=0.7)
    erased = image(pipe)
    state_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    path = save_single_file(pipe, tmp_path / "merged.safetensors")
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in state_before.items())  # nothing fused
    loaded = load_pipeline(path, config=folder)
    for component, module in SDXL_LORA:
        a = adapter.tensors[f"{component}.{module}.lora_A.weight"]
        b = adapter.tensors[f"{component}.{module}.lora_B.weight"]
        base = originals[component][f"{module}.weight"]
        expected = base + 0.7 * ALPHA / RANK * (b.flatten(1) @ a.flatten(1)).reshape(base.shape)
        got = getattr(loaded, component).state_dict()[f"{module}.weight"]
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert not torch.allclose(got, base, atol=1e-3)
    untouched = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_q.weight"
    assert torch.equal(loaded.unet.state_dict()[untouched], originals["unet"][untouched])
    np.testing.assert_allclose(image(loaded), erased, rtol=0, atol=1e-5)
    pipe.unload_erasure()
    assert all(torch.equal(v, originals["unet"][k]) for k, v in pipe.unet.state_dict().items())


def test_checkpoint_export_of_a_delta_is_the_erased_pipeline_bit_for_bit(tmp_path):
    pipe = tiny_sd2_pipeline()
    before = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", "text_encoder")}
    folder = config_folder(pipe, tmp_path / "config")
    adapter = delta_adapter(pipe, [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
                                   ("unet", "conv_in.bias"),
                                   ("text_encoder", "encoder.layers.2.self_attn.k_proj.weight"),
                                   ("text_encoder", "encoder.layers.0.self_attn.v_proj.bias")])
    path = export_checkpoint(adapter, pipe, tmp_path / "erased.safetensors")
    for component, state in before.items():  # a pipeline passed in is left as it was
        assert all(torch.equal(v, getattr(pipe, component).state_dict()[k]) for k, v in state.items())
    expected = tiny_sd2_pipeline()
    expected.load_erasure(adapter)
    loaded = StableDiffusionPipeline.from_single_file(str(path), config=str(folder))
    assert_same_weights(expected, loaded)
    changed = loaded.text_encoder.state_dict()["encoder.layers.2.self_attn.k_proj.weight"]
    assert not torch.equal(changed, before["text_encoder"]["encoder.layers.2.self_attn.k_proj.weight"])


def test_checkpoint_export_refuses_what_it_cannot_do(tmp_path):
    pipe = tiny_sd_pipeline()
    adapter = delta_adapter(pipe, [("unet", "conv_in.weight")])
    out = tmp_path / "m.safetensors"
    with pytest.raises(AdapterError, match="base model"):  # the adapter-format layer points at the right call
        export_adapter(adapter, "checkpoint", out)
    with pytest.raises(AdapterError, match="not an unsee pipeline"):
        export_checkpoint(adapter, tiny_sd_pipeline(StableDiffusionPipeline), out)
    with pytest.raises(AdapterError, match=".safetensors"):
        export_checkpoint(adapter, pipe, tmp_path / "m.ckpt")
    refiner = tiny_sdxl()
    refiner.text_encoder = None
    with pytest.raises(AdapterError, match="refiner"):
        export_checkpoint(adapter, refiner, out)
    assert not refiner.active_erasures
    out.write_bytes(b"precious")
    with pytest.raises(AdapterError, match="overwrite"):
        export_checkpoint(adapter, pipe, out)
    assert out.read_bytes() == b"precious" and not pipe.active_erasures
    assert unsee.save_single_file is save_single_file


# ---------------------------------------------------------------------------------------------
# unsee export --format checkpoint
# ---------------------------------------------------------------------------------------------


def test_cli_writes_the_merged_checkpoint(tmp_path, capsys):
    pipe = tiny_sdxl()
    model = tmp_path / "model"
    pipe.save_pretrained(model)
    adapter = lora_adapter(pipe, SDXL_LORA)
    source = save_adapter(adapter, tmp_path / "esd-x-circle.safetensors")
    out = tmp_path / "out" / "merged.safetensors"
    assert main(["export", str(source), "--format", "checkpoint", "--model", str(model), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "sdxl layout" in printed
    pipe.load_erasure(source)
    expected = single_file_state_dict(pipe)
    got = keys_of(out)
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=1e-6)
    loaded = load_pipeline(out, config=model)
    np.testing.assert_allclose(image(loaded), image(pipe), rtol=0, atol=1e-5)


def test_cli_refuses_bad_input_in_one_line_before_loading(tmp_path, capsys, monkeypatch, tiny_sd_folder):
    import unsee.cli

    def no_loading(args):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(unsee.cli, "_load", no_loading)
    pipe = tiny_sd_pipeline()
    source = save_adapter(delta_adapter(pipe, [("unet", "conv_in.weight")]), tmp_path / "a.safetensors")
    out = tmp_path / "m.safetensors"
    cases = [
        (["--format", "checkpoint", "--out", str(out)], "--model"),
        (["--format", "kohya", "--model", str(tiny_sd_folder), "--out", str(out)], "--format checkpoint"),
        (["--format", "checkpoint", "--model", str(tiny_sd_folder), "--out", str(tmp_path / "m.ckpt")], ".safetensors"),
        (["--format", "checkpoint", "--model", str(tiny_sd_folder), "--rank", "4", "--out", str(out)], "--rank"),
        (["--format", "checkpoint", "--model", str(tiny_sd_folder), "--out", str(source), "--overwrite"], "ADAPTER"),
    ]
    for extra, words in cases:
        assert main(["export", str(source), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    out.write_bytes(b"precious")
    assert main(["export", str(source), "--format", "checkpoint", "--model", str(tiny_sd_folder),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and len(err.splitlines()) == 1
    assert out.read_bytes() == b"precious"
