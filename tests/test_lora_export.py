"""LoRA export and import (issue 26 items 1-2): kohya / diffusers / peft formats, kohya files read by unsee, and
LoRAs fitted to full-weight deltas by truncated SVD.

Images compared within 1e-5: an exported file loaded by plain diffusers (``load_lora_weights``), by peft, or by
unsee's ``load_erasure`` gives the images the original adapter gives with ``load_erasure``.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import diffusers  # noqa: E402
import pytest  # noqa: E402
import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from diffusers.utils import convert_state_dict_to_kohya  # noqa: E402

import unsee  # noqa: E402
from unsee import lora_formats  # noqa: E402
from unsee.adapter_export import export_adapter  # noqa: E402
from unsee.adapters import Adapter, AdapterError, fingerprint, load_adapter, module_paths, save_adapter  # noqa: E402
from unsee.cli import main  # noqa: E402
from unsee.testing import SD15_UNET_CONFIG, SDXL_UNET_CONFIG, tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402

PROMPT = "a red circle on a gray background"
RANK, ALPHA = 3, 5.0  # alpha != rank: a wrong alpha shows in the images
SD_MODULES = [
    ("unet", "conv_in"),
    ("unet", "time_embedding.linear_1"),
    ("unet", "down_blocks.0.resnets.0.conv1"),
    ("unet", "down_blocks.0.resnets.0.time_emb_proj"),
    ("unet", "down_blocks.0.attentions.0.proj_in"),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    ("unet", "up_blocks.1.resnets.0.conv_shortcut"),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"),
    ("text_encoder", "text_model.encoder.layers.1.mlp.fc1"),
    # diffusers 0.42.1 reads a kohya text-encoder LoRA's keys right only when it has an out_proj module (it guesses the
    # key style from "to_out_lora"); real kohya LoRAs have one, and so do these
    ("text_encoder", "text_model.encoder.layers.1.self_attn.out_proj"),
]
SDXL_MODULES = [
    ("unet", "conv_in"),
    ("unet", "add_embedding.linear_1"),
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v"),
    ("unet", "down_blocks.1.attentions.0.proj_in"),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.k_proj"),
    ("text_encoder", "text_model.encoder.layers.0.self_attn.out_proj"),
    ("text_encoder_2", "text_model.encoder.layers.1.self_attn.out_proj"),
    ("text_encoder_2", "text_projection"),
]
PIPES = {"sd": (tiny_sd_pipeline, StableDiffusionPipeline, SD_MODULES),
         "sdxl": (tiny_sdxl_pipeline, StableDiffusionXLPipeline, SDXL_MODULES)}


def image(pipe):
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


def close(got, expected):
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def resolve(pipe, component, path):
    """The path as this transformers spells it (CLIPTextModel lost its text_model level in transformers 5)."""
    names = dict(getattr(pipe, component).named_modules()) | dict(getattr(pipe, component).named_parameters())
    return path if path in names else path.removeprefix("text_model.")


def lora_adapter(pipe, modules, rank=RANK, alpha=ALPHA, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, path in modules:
        path = resolve(pipe, component, path)
        w = getattr(pipe, component).get_submodule(path).weight
        a, b = ((rank, w.shape[1]), (w.shape[0], rank)) if w.ndim == 2 else ((rank, *w.shape[1:]), (w.shape[0], rank, 1, 1))
        tensors[f"{component}.{path}.lora_A.weight"] = torch.randn(a, generator=g) * 0.3
        tensors[f"{component}.{path}.lora_B.weight"] = torch.randn(b, generator=g) * 0.3
    components = sorted({k.split(".", 1)[0] for k in tensors})
    return Adapter(kind="lora", method="esd-x", concepts=["circle"], tensors=tensors,
                   fingerprint=fingerprint(pipe, components), rank=rank, alpha=alpha)


def delta_adapter(pipe, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {c: dict(getattr(pipe, c).named_parameters()) for c in ("unet", "text_encoder")}
    names = [(c, resolve(pipe, c, n)) for c, n in names]
    tensors = {f"{c}.{n}": torch.randn(params[c][n].shape, generator=g) * 0.05 for c, n in names}
    components = sorted({k.split(".", 1)[0] for k in tensors})
    return Adapter(kind="delta", method="esd-u", concepts=["circle"], tensors=tensors,
                   fingerprint=fingerprint(pipe, components))


def erased_image(build, source):
    pipe = build()
    pipe.load_erasure(source)
    return image(pipe)


# ---------------------------------------------------------------------------------------------
# key names
# ---------------------------------------------------------------------------------------------


def _real_unet_paths(config):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.mark.parametrize("which", ["tiny-sd", "tiny-sdxl", "sd15-unet", "sdxl-unet"])
def test_kohya_module_names_decode_without_a_model(which):
    """Every Linear/Conv module of SD/SDXL UNets and CLIP encoders: kohya name -> dotted path gives the path back,
    by the module-name rules alone (no model needed) and from the model's module list."""
    if which.startswith("tiny"):
        pipe = (tiny_sd_pipeline if which == "tiny-sd" else tiny_sdxl_pipeline)()
        paths = module_paths(pipe)
    else:
        paths = {"unet": _real_unet_paths(SD15_UNET_CONFIG if which == "sd15-unet" else SDXL_UNET_CONFIG)}
    for component, names in paths.items():
        for path in names:
            name = lora_formats.kohya_module_name(component, path, sdxl=which != "tiny-sd")
            prefix = next(p for p in lora_formats.KOHYA_PREFIXES if name.startswith(p))
            want = lora_formats._kohya_path(component, path)
            assert lora_formats.kohya_module_path(name[len(prefix):]) == want, name
            assert lora_formats.kohya_module_path(name[len(prefix):], names) == path, name


# ---------------------------------------------------------------------------------------------
# LoRA adapters: lossless export
# ---------------------------------------------------------------------------------------------


# diffusers 0.40's kohya converter drops the text-encoder ranks of a kohya file and fails ("list index out of range"
# in get_peft_kwargs); 0.41 reads the same files
needs_kohya_text_encoder_reader = pytest.mark.skipif(
    tuple(int(p) for p in diffusers.__version__.split(".")[:2]) < (0, 41),
    reason="plain diffusers reads kohya text-encoder LoRAs from 0.41 on")


@needs_kohya_text_encoder_reader
@pytest.mark.parametrize("arch", ["sd", "sdxl"])
def test_exported_lora_gives_the_same_images_in_diffusers_and_unsee(arch, tmp_path):
    build, plain, modules = PIPES[arch]
    source = save_adapter(lora_adapter(build(), modules), tmp_path / "erase.safetensors")
    reference = erased_image(build, source)
    for fmt in ("kohya", "diffusers"):
        result = export_adapter(source, fmt, tmp_path / f"{fmt}.safetensors")
        assert (result.rank, result.alpha, result.modules) == (RANK, ALPHA, len(modules))
        diffusers_pipe = build(plain)
        diffusers_pipe.load_lora_weights(str(result.path))
        close(image(diffusers_pipe), reference)
        close(erased_image(build, result.path), reference)
    with safetensors.safe_open(str(tmp_path / "kohya.safetensors"), "pt") as handle:
        keys = list(handle.keys())
        alphas = {float(handle.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert alphas == {ALPHA}  # the true alpha, not the rank
    te_prefixes = {"_".join(k.split("_")[:2]) + "_" for k in keys if k.startswith("lora_te")}
    assert te_prefixes == ({"lora_te_"} if arch == "sd" else {"lora_te1_", "lora_te2_"})
    # the diffusers export holds what save_lora_weights reads back: same tensors, alpha in the header
    state, *_, metadata = plain.lora_state_dict(str(tmp_path / "diffusers.safetensors"), return_lora_metadata=True)
    original = load_adapter(source).tensors
    assert set(state) == set(original) and all(torch.equal(state[k], original[k]) for k in state)
    assert {v for k, v in metadata.items() if k.endswith("lora_alpha")} == {ALPHA}


def test_diffusers_own_kohya_converter_gets_alpha_wrong(tmp_path):
    """Why unsee writes alphas itself: diffusers' convert_state_dict_to_kohya writes alpha = rank."""
    adapter = lora_adapter(tiny_sd_pipeline(), [m for m in SD_MODULES if m[0] == "unet"])
    source = save_adapter(adapter, tmp_path / "erase.safetensors")
    theirs = convert_state_dict_to_kohya(adapter.tensors)
    assert {float(v) for k, v in theirs.items() if k.endswith(".alpha")} == {float(RANK)}
    safetensors.torch.save_file({k: v.contiguous() for k, v in theirs.items()}, str(tmp_path / "theirs.safetensors"))
    pipe = tiny_sd_pipeline(StableDiffusionPipeline)
    pipe.load_lora_weights(str(tmp_path / "theirs.safetensors"))
    assert np.abs(image(pipe) - erased_image(tiny_sd_pipeline, source)).max() > 1e-3


def test_kohya_round_trip_is_bit_exact_and_keeps_the_description(tmp_path):
    adapter = lora_adapter(tiny_sdxl_pipeline(), SDXL_MODULES)
    export_adapter(adapter, "kohya", tmp_path / "k.safetensors")
    back = load_adapter(tmp_path / "k.safetensors")
    assert (back.kind, back.method, back.concepts, back.rank, back.alpha) == ("lora", "esd-x", ["circle"], RANK, ALPHA)
    assert back.fingerprint == adapter.fingerprint
    # kohya spells CLIP's text_model level, which CLIPTextModel no longer has in transformers 5: same modules
    unprefixed = {k.replace(".text_model.", "."): v for k, v in back.tensors.items()}
    original = {k.replace(".text_model.", "."): v for k, v in adapter.tensors.items()}
    assert set(unprefixed) == set(original)
    assert all(torch.equal(unprefixed[k], original[k]) for k in original)


def test_foreign_kohya_file_with_per_module_ranks_and_alphas(tmp_path):
    """A kohya file made elsewhere: modules of different ranks and alphas (an integer alpha as diffusers writes, two
    missing): unsee reads it (method 'unknown', matched by shapes) and gives the images of the weights merged by hand
    with each module's (alpha / rank) * up @ down. (diffusers 0.42.1's own loader is 0.066 off on this file.)"""
    pipe = tiny_sd_pipeline()
    merged = tiny_sd_pipeline(StableDiffusionPipeline)
    g = torch.Generator().manual_seed(3)
    state = {}
    modules = SD_MODULES[:6] + [SD_MODULES[9], SD_MODULES[11]]
    for (component, path), rank, alpha in zip(modules, [1, 2, 4, 2, 3, 4, 2, 3], [1.0, 8.0, 4, None, 0.5, 16.0, 3.0, None]):
        path = resolve(pipe, component, path)
        w = getattr(merged, component).get_submodule(path).weight
        name = lora_formats.kohya_module_name(component, path)
        down = torch.randn((rank, *w.shape[1:]) if w.ndim == 4 else (rank, w.shape[1]), generator=g) * 0.3
        up = torch.randn((w.shape[0], rank, 1, 1) if w.ndim == 4 else (w.shape[0], rank), generator=g) * 0.3
        state[name + ".lora_down.weight"], state[name + ".lora_up.weight"] = down, up
        if alpha is not None:
            state[name + ".alpha"] = torch.tensor(alpha)
        with torch.no_grad():
            w += ((alpha if alpha is not None else rank) / rank) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file(state, str(path), metadata={"ss_network_module": "networks.lora"})
    truth = image(merged)
    close(erased_image(tiny_sd_pipeline, path), truth)
    adapter = load_adapter(path)
    assert adapter.method == "unknown" and adapter.concepts == []
    assert set(adapter.fingerprint.values()) == {"unknown"} and adapter.rank == 4
    # exported again (kohya -> diffusers: one alpha, per-module scalings folded): plain diffusers gets it right
    export_adapter(path, "diffusers", tmp_path / "d.safetensors")
    again = tiny_sd_pipeline(StableDiffusionPipeline)
    again.load_lora_weights(str(tmp_path / "d.safetensors"))
    close(image(again), truth)


def test_peft_export_loads_with_peft(tmp_path):
    from peft import PeftModel

    build, plain, modules = PIPES["sd"]
    adapter = lora_adapter(build(), modules)
    reference = erased_image(build, adapter)
    result = export_adapter(adapter, "peft", tmp_path / "peft")
    pipe = build(plain)
    for component in ("unet", "text_encoder"):
        assert json.loads((tmp_path / "peft" / component / "adapter_config.json").read_text())["lora_alpha"] == ALPHA
        PeftModel.from_pretrained(getattr(pipe, component), str(result.path / component))  # injects in place
    close(image(pipe), reference)


# ---------------------------------------------------------------------------------------------
# LoRA from a delta
# ---------------------------------------------------------------------------------------------


def test_extraction_error_is_the_exact_reconstruction_error():
    g = torch.Generator().manual_seed(0)
    deltas = {"unet.a.weight": torch.randn(12, 7, generator=g), "unet.b.weight": torch.randn(6, 4, 3, 3, generator=g),
              "unet.c.weight": torch.zeros(5, 5)}
    for rank in (1, 3, 5, 36):
        fit = lora_formats.extract_lora(deltas, rank)
        tail = norm = 0.0
        for key, delta in deltas.items():
            a = fit.tensors[key[:-len(".weight")] + ".lora_A.weight"].double().flatten(1)
            b = fit.tensors[key[:-len(".weight")] + ".lora_B.weight"].double().flatten(1)
            assert a.shape[0] == rank and b.shape[1] == rank
            residual = float((delta.double().flatten(1) - b @ a).norm())
            expected = residual / float(delta.double().norm()) if float(delta.norm()) > 0 else 0.0
            assert math.isclose(fit.errors[key], expected, rel_tol=1e-5, abs_tol=1e-6), (key, rank)
            tail, norm = tail + residual ** 2, norm + float(delta.double().norm()) ** 2
        assert math.isclose(fit.overall, math.sqrt(tail / norm), rel_tol=1e-5, abs_tol=1e-6)
        if rank >= 36:  # at least every tensor's smaller dimension: exact
            assert fit.overall < 1e-6
    assert fit.errors["unet.a.weight"] < 1e-6 and lora_formats.extract_lora(deltas, 1).overall > 0.3


@needs_kohya_text_encoder_reader
def test_full_rank_lora_from_a_delta_gives_the_same_images(tmp_path, capsys):
    names = [("unet", "conv_in.weight"), ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
             ("unet", "up_blocks.1.resnets.0.conv1.weight"), ("text_encoder", "text_model.encoder.layers.0.self_attn.out_proj.weight")]  # see SD_MODULES
    source = save_adapter(delta_adapter(tiny_sd_pipeline(), names), tmp_path / "delta.safetensors")
    reference = erased_image(tiny_sd_pipeline, source)
    out = tmp_path / "k.safetensors"
    assert main(["export", str(source), "--format", "kohya", "--rank", "300", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "overall relative Frobenius error" in printed and printed.count("relative error") == len(names)
    with safetensors.safe_open(str(out), "pt") as handle:
        summary = json.loads(handle.metadata()["unsee_lora_extraction"])
    assert summary["overall_relative_error"] < 1e-6 and len(summary["relative_errors"]) == len(names)
    plain = tiny_sd_pipeline(StableDiffusionPipeline)
    plain.load_lora_weights(str(out))
    close(image(plain), reference)
    close(erased_image(tiny_sd_pipeline, out), reference)
    # a low rank is lossy, and says so in its header
    fit = export_adapter(source, "diffusers", tmp_path / "r1.safetensors", rank=1).extraction
    assert fit.overall > 0.1
    assert load_adapter(tmp_path / "r1.safetensors").training["lora_extraction"]["overall_relative_error"] == fit.overall


def test_biases_are_refused_unless_dropped(tmp_path, capsys):
    names = [("unet", "conv_in.weight"), ("unet", "conv_in.bias"), ("unet", "conv_norm_out.weight")]
    source = save_adapter(delta_adapter(tiny_sd_pipeline(), names), tmp_path / "delta.safetensors")
    out = tmp_path / "k.safetensors"
    assert main(["export", str(source), "--format", "kohya", "--rank", "4", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "--drop-other" in error and "conv_in.bias" in error and "\n" not in error.strip() and not out.exists()
    result = export_adapter(source, "kohya", out, rank=4, drop_other=True)
    assert result.extraction.dropped == ["unet.conv_in.bias", "unet.conv_norm_out.weight"]
    assert result.extraction.errors["unet.conv_in.bias"] == 1.0 and result.modules == 1
    assert result.extraction.overall > result.extraction.errors["unet.conv_in.weight"]


def test_delta_needs_rank_and_lora_refuses_rank(tmp_path):
    pipe = tiny_sd_pipeline()
    with pytest.raises(AdapterError, match="--rank"):
        export_adapter(delta_adapter(pipe, [("unet", "conv_in.weight")]), "kohya", tmp_path / "a.safetensors")
    with pytest.raises(AdapterError, match="LoRA already"):
        export_adapter(lora_adapter(pipe, SD_MODULES[:1]), "kohya", tmp_path / "a.safetensors", rank=2)
    assert not (tmp_path / "a.safetensors").exists()


def test_export_never_clobbers_without_overwrite(tmp_path, capsys):
    source = save_adapter(lora_adapter(tiny_sd_pipeline(), SD_MODULES[:2]), tmp_path / "erase.safetensors")
    out = tmp_path / "k.safetensors"
    out.write_bytes(b"precious")
    assert main(["export", str(source), "--format", "kohya", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main(["export", str(source), "--format", "kohya", "--out", str(out), "--overwrite"]) == 0
    assert load_adapter(out).rank == RANK
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_python_api_is_exported():
    assert unsee.export_adapter is export_adapter


# ---------------------------------------------------------------------------------------------
# formats unsee cannot read
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keys, words", [
    ({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": (2, 8), "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": (8, 2)},
     ["SGM", "pipe.load_lora_weights"]),
    ({"lora_unet_conv_in.hada_w1_a": (2, 8), "lora_unet_conv_in.hada_w1_b": (2, 8)}, ["LyCORIS", "pipe.load_lora_weights"]),
    ({"base_model.model.conv_in.lora_A.weight": (2, 4, 3, 3)}, ["PEFT", "PeftModel.from_pretrained"]),
    ({"unet.conv_in.lora_A.weight": (2, 4, 3, 3), "unet.conv_in.lora_B.weight": (16, 2, 1, 1)},
     ["plain diffusers LoRA", "unsee export", "--format diffusers"]),
])
def test_foreign_formats_are_refused_naming_format_and_fix(tmp_path, keys, words):
    path = tmp_path / "foreign.safetensors"
    safetensors.torch.save_file({k: torch.zeros(s) for k, s in keys.items()}, str(path))
    pipe = tiny_sd_pipeline()
    for load in (load_adapter, pipe.load_erasure):
        with pytest.raises(AdapterError) as caught:
            load(path)
        for word in words:
            assert word in str(caught.value)
    assert pipe.active_erasures == {}


def test_plain_diffusers_lora_converts_with_export(tmp_path):
    """The conversion the refusal names works: plain save_lora_weights output -> unsee adapter, same images."""
    adapter = lora_adapter(tiny_sd_pipeline(), SD_MODULES)
    plain_path = tmp_path / "plain"
    StableDiffusionPipeline.save_lora_weights(
        plain_path, unet_lora_layers={k[5:]: v for k, v in adapter.tensors.items() if k.startswith("unet.")},
        text_encoder_lora_layers={k[13:]: v for k, v in adapter.tensors.items() if k.startswith("text_encoder.")},
        unet_lora_adapter_metadata={"r": RANK, "lora_alpha": ALPHA},
        text_encoder_lora_adapter_metadata={"r": RANK, "lora_alpha": ALPHA})
    out = tmp_path / "unsee.safetensors"
    assert main(["export", str(plain_path / "pytorch_lora_weights.safetensors"), "--format", "diffusers",
                 "--out", str(out)]) == 0
    close(erased_image(tiny_sd_pipeline, out), erased_image(tiny_sd_pipeline, adapter))


def test_generate_with_a_kohya_export_makes_the_images_of_the_unsee_file(tmp_path):
    from pathlib import Path

    import numpy as np
    from PIL import Image

    example = Path(__file__).resolve().parents[1] / "weights" / "examples" / "spm-circle.safetensors"
    kohya = tmp_path / "spm-circle-kohya.safetensors"
    assert main(["export", str(example), "--format", "kohya", "--out", str(kohya)]) == 0
    assert lora_formats.foreign_format(list(safetensors.safe_open(str(kohya), "pt").keys()), {})[0] == "kohya"
    images = {}
    for name, adapter in (("unsee", example), ("kohya", kohya), ("none", None)):
        out = tmp_path / name
        flags = ["--adapter", str(adapter)] if adapter else []
        assert main(["generate", "--model", "toy", "--prompt", "a red circle on a gray background", "--steps", "3",
                     *flags, "--out", str(out), "--device", "cpu"]) == 0
        (png,) = sorted(out.glob("*.png"))
        images[name] = np.asarray(Image.open(png)).astype(np.int16)
    assert np.abs(images["unsee"] - images["kohya"]).max() <= 1  # the same image, up to 8-bit rounding
    assert np.abs(images["unsee"] - images["none"]).mean() > 1  # and the adapter did change it
