import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from conftest import seeded
from unsee import load_pipeline
from unsee.convert import save_single_file
from unsee.loading import ModelLoadError
from unsee.pipelines import UnseeStableDiffusionPipeline, UnseeStableDiffusionXLPipeline
from unsee.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

CALL = dict(num_inference_steps=3, guidance_scale=5.0, output_type="pt")


@pytest.mark.parametrize("ours, theirs, build", [
    (UnseeStableDiffusionPipeline, StableDiffusionPipeline, tiny_sd_pipeline),
    (UnseeStableDiffusionXLPipeline, StableDiffusionXLPipeline, tiny_sdxl_pipeline),
])
def test_our_pipelines_match_diffusers_for_the_same_seed(ours, theirs, build):
    a = build(ours)("a red circle", negative_prompt="blue", generator=seeded(3), **CALL).images
    b = build(theirs)("a red circle", negative_prompt="blue", generator=seeded(3), **CALL).images
    assert a.shape == b.shape and a.std() > 0
    assert torch.equal(a, b)


def test_from_pipe_keeps_half_precision():
    base = StableDiffusionPipeline(**{k: v for k, v in tiny_sd_pipeline().components.items()}).to(dtype=torch.float16)
    ours = UnseeStableDiffusionPipeline.from_pipe(base)
    assert isinstance(ours, UnseeStableDiffusionPipeline)
    assert ours.unet.dtype == torch.float16 and base.unet.dtype == torch.float16
    assert ours.unet is base.unet  # components are shared, not copied
    explicit = UnseeStableDiffusionPipeline.from_pipe(base, dtype=torch.float32)
    assert explicit.unet.dtype == torch.float32


def test_sdxl_folder_loads_as_the_sdxl_subclass(tmp_path):
    tiny_sdxl_pipeline().save_pretrained(tmp_path)
    pipe = load_pipeline(tmp_path)
    assert type(pipe) is UnseeStableDiffusionXLPipeline


def test_folder_and_single_file_load_back_identically(tiny_sd_folder, tmp_path):
    source = tiny_sd_pipeline()
    from_folder = load_pipeline(tiny_sd_folder)
    assert type(from_folder) is UnseeStableDiffusionPipeline
    single = save_single_file(source, tmp_path / "tiny.safetensors")
    from_file = load_pipeline(single, config=tiny_sd_folder)
    assert type(from_file) is UnseeStableDiffusionPipeline
    for name in ("unet", "vae", "text_encoder"):
        expected = getattr(source, name).state_dict()
        for pipe in (from_folder, from_file):
            got = getattr(pipe, name).state_dict()
            assert set(got) == set(expected)
            assert all(torch.equal(got[k], expected[k]) for k in expected), name
    a = source("a star", generator=seeded(), **CALL).images
    b = from_file("a star", generator=seeded(), **CALL).images
    assert torch.equal(a, b)


def test_load_pipeline_dtype_and_device(tiny_sd_folder):
    pipe = load_pipeline(tiny_sd_folder, dtype=torch.float16, device="cpu")
    assert pipe.unet.dtype == torch.float16 and pipe.device.type == "cpu"


def test_load_errors_say_what_to_do(tmp_path, tiny_sd_folder, monkeypatch):
    with pytest.raises(ModelLoadError, match="no file or folder"):
        load_pipeline(tmp_path / "missing.safetensors")
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline"):
        load_pipeline(tmp_path)
    single = save_single_file(tiny_sd_pipeline(), tmp_path / "tiny.safetensors")
    with pytest.raises(ModelLoadError, match="config="):
        load_pipeline(single)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_pipeline("nobody/no-such-model")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="not a checkpoint"):
        load_pipeline(tmp_path / "notes.txt")
    other = tmp_path / "flux"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["x", "y"]}))
    with pytest.raises(ModelLoadError, match="supports Stable Diffusion"):
        load_pipeline(other)
    import unsee.loading

    monkeypatch.setattr(unsee.loading, "TOY_MODEL_DIR", tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="toy model is missing"):
        load_pipeline("toy")
