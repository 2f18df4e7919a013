"""The distillation fusion of text-encoder adapters (``unsee fuse --method distill``, unsee.erasure.distill)."""

from __future__ import annotations

import pytest
import torch

from unsee.adapters import Adapter, AdapterError, component_fingerprint, load_adapter
from unsee.cli import main
from unsee.erasure import ConfigError
from unsee.erasure.distill import DistillConfig, TextEncoderDistiller
from unsee.fuse import fuse_adapters
from unsee.jobs import plan_jobs
from unsee.pipelines.encoding import encode_text
from unsee.testing import tiny_sd_pipeline

PROMPTS = {"circle": ["circle", "a circle", "a red circle", "a circle on black"],
           "star": ["star", "a star", "a blue star", "a star on white"]}
PRESERVE = ["", "a square", "a green square", "a cross on gray", "a heart", "a yellow triangle"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def _te_delta(pipe, seed, concept, layers=(0, 1), scale=0.3):
    """A text-encoder delta on the MLPs of ``layers``, large enough to move the embeddings."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(pipe.text_encoder.named_parameters())
    names = [n for n in params if any(f"layers.{i}.mlp.fc" in n for i in layers) and n.endswith("weight")]
    tensors = {f"text_encoder.{n}": torch.randn(params[n].shape, generator=generator) * scale for n in names}
    return Adapter(kind="text_encoder", method="advunlearn", concepts=[concept], tensors=tensors,
                   fingerprint={"text_encoder": component_fingerprint(pipe.text_encoder)})


def _embeddings(pipe, texts, adapters=()):
    for i, adapter in enumerate(adapters):
        pipe.load_erasure(adapter, adapter_name=f"t{i}")
    try:
        with torch.no_grad():
            return encode_text(pipe, texts, "cpu")[0]
    finally:
        if adapters:
            pipe.unload_erasure()


def _mse(a, b):
    return float((a - b).pow(2).mean())


def test_distillation_fits_each_source_on_its_prompts_and_keeps_the_rest(pipe):
    a, b = _te_delta(pipe, 1, "circle"), _te_delta(pipe, 2, "star", layers=(1,))
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    grads = [p.requires_grad for p in pipe.text_encoder.parameters()]
    config = DistillConfig(steps=300, lr=3e-3, batch_size=8, seed=0)
    fused = fuse_adapters([a, b], method="distill", distill=TextEncoderDistiller(pipe, config),
                          prompts={c: p[2:] for c, p in PROMPTS.items()}, preserve=PRESERVE)
    # the pipeline is left bit for bit as it was
    after = pipe.text_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in pipe.text_encoder.parameters()] == grads
    assert fused.kind == "text_encoder" and fused.concepts == ["circle", "star"] and fused.method == "advunlearn"
    assert fused.tensors.keys() == a.tensors.keys() | b.tensors.keys()
    assert fused.hyperparameters["fuse"] == "distill" and fused.hyperparameters["distill"]["steps"] == 300
    assert fused.hyperparameters["refit_prompts"] == [["circle", "a red circle", "a circle on black"],
                                                      ["star", "a blue star", "a star on white"]]
    stack = fuse_adapters([a, b])
    for source, texts in ((a, PROMPTS["circle"]), (b, PROMPTS["star"])):
        target = _embeddings(pipe, texts, [source])
        original, stacked, got = (_embeddings(pipe, texts, adapters) for adapters in ((), [stack], [fused]))
        # each source's prompts (two of them never trained on) get close to what that source gives them
        assert _mse(got, target) < 0.2 * _mse(original, target), source.concepts
        assert _mse(got, target) < 0.5 * _mse(stacked, target), source.concepts
    # the preserved prompts stay near the original model, where the sum of the deltas moves them
    original = _embeddings(pipe, PRESERVE)
    assert _mse(_embeddings(pipe, PRESERVE, [fused]), original) < 0.2 * _mse(_embeddings(pipe, PRESERVE, [stack]),
                                                                            original)


def test_distillation_refuses_unet_adapters_a_missing_trainer_and_a_pipeline_with_adapters(pipe):
    a, b = _te_delta(pipe, 1, "circle"), _te_delta(pipe, 2, "star")
    params = dict(pipe.unet.named_parameters())
    name = next(n for n in params if n.endswith("attn2.to_k.weight"))
    unet = Adapter(kind="delta", method="esd-u", concepts=["star"], tensors={f"unet.{name}": params[name] * 0},
                   fingerprint={"unet": component_fingerprint(pipe.unet)})
    distiller = TextEncoderDistiller(pipe, DistillConfig(steps=1))
    with pytest.raises(AdapterError, match=r"adapter 2 \(esd-u star\) changes the UNet; method 'distill' fuses"):
        fuse_adapters([a, unet], method="distill", distill=distiller)
    # adapters of another model: refused by the pipeline's own check (match_adapter) before any training
    others = [Adapter(kind="text_encoder", method="advunlearn", concepts=[c], tensors=dict(s.tensors),
                      fingerprint={"text_encoder": "0" * 64}) for c, s in (("circle", a), ("star", b))]
    with pytest.raises(AdapterError, match=r"adapter 1 \(advunlearn circle\): adapter was trained for another arch"):
        fuse_adapters(others, method="distill", distill=distiller)
    with pytest.raises(AdapterError, match="method 'distill' needs distill="):
        fuse_adapters([a, b], method="distill")
    with pytest.raises(AdapterError, match="needs a non-empty list of prompts to preserve"):
        fuse_adapters([a, b], method="distill", distill=distiller, preserve=[])
    pipe.load_erasure(a, adapter_name="left-on")
    try:
        with pytest.raises(ConfigError, match="has erasure adapters loaded .*unload_erasure"):
            fuse_adapters([a, b], method="distill", distill=distiller)
    finally:
        pipe.unload_erasure()
    with pytest.raises(ConfigError, match=r"erased_share .* must be in \(0, 1\], got 0"):
        DistillConfig(erased_share=0)


def test_cli_distill_fuse_and_erase_fuse_distill(tiny_sd_folder, tmp_path, capsys, monkeypatch):
    import functools

    import unsee.jobs
    from unsee.loading import load_pipeline

    model = load_pipeline(str(tiny_sd_folder))
    paths = [_te_delta(model, 3, "circle").save(tmp_path / "a.safetensors"),
             _te_delta(model, 4, "star").save(tmp_path / "b.safetensors")]
    out = tmp_path / "distilled.safetensors"
    assert main(["fuse", *map(str, paths), "--out", str(out), "--method", "distill", "--model", str(tiny_sd_folder),
                 "--preserve", "", "--preserve", "a red square", "--template", "a photo of {concept}",
                 "--steps", "30", "--lr", "0.001"]) == 0
    fused = load_adapter(out)
    assert fused.kind == "text_encoder" and fused.hyperparameters["fuse"] == "distill"
    assert fused.hyperparameters["preserve"] == ["", "a red square"]
    assert fused.hyperparameters["refit_prompts"] == [["circle", "a photo of circle"], ["star", "a photo of star"]]
    assert fused.hyperparameters["distill"] == {"steps": 30, "lr": 1e-3, "batch_size": 32, "erased_share": 0.5,
                                                "seed": 0}
    model.load_erasure(out)
    capsys.readouterr()
    # MACE's own weights are refused with distill, and UNet adapters before any training, each in one line
    assert main(["fuse", *map(str, paths), "--out", str(tmp_path / "x.safetensors"), "--method", "distill",
                 "--model", str(tiny_sd_folder), "--lamb", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lamb is for --method mace" in err
    assert main(["fuse", *map(str, paths), "--out", str(tmp_path / "x.safetensors"), "--method", "mace",
                 "--model", str(tiny_sd_folder), "--steps", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--steps is for --method distill" in err
    params = dict(model.unet.named_parameters())
    name = next(n for n in params if n.endswith("attn2.to_k.weight"))
    unet = Adapter(kind="delta", method="esd-u", concepts=["star"], tensors={f"unet.{name}": params[name] * 0},
                   fingerprint={"unet": component_fingerprint(model.unet)}).save(tmp_path / "u.safetensors")
    assert main(["fuse", str(paths[0]), str(unet), "--out", str(tmp_path / "x.safetensors"), "--method", "distill",
                 "--model", str(tiny_sd_folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "changes the UNet" in err and not (tmp_path / "x.safetensors").exists()
    # `unsee erase` of several concepts with AdvUnlearn: one run per concept, distilled into one text-encoder adapter
    # (the default fusion for a method that trains the text encoder)
    erased = tmp_path / "erased.safetensors"
    monkeypatch.setattr(unsee.jobs, "distill_options",
                        functools.partial(unsee.jobs.distill_options, config=DistillConfig(steps=20)))
    assert main(["erase", "--method", "advunlearn", "--concept", "circle", "--concept", "star",
                 "--out", str(erased), "--model", str(tiny_sd_folder), "--steps", "1", "--set", "ddim_steps=1",
                 "--set", "warmup=0", "--set", "attack_steps=1", "--grid", "0"]) == 0
    fused = load_adapter(erased)
    assert fused.kind == "text_encoder" and fused.concepts == ["circle", "star"]
    assert fused.hyperparameters["fuse"] == "distill" and fused.hyperparameters["distill"]["steps"] == 20
    # jobs: distill takes text-encoder methods alone, refused for the others before any work
    jobs, _ = plan_jobs({"method": "advunlearn", "concept": ["circle", "star"], "fuse": "f.safetensors",
                         "fuse_method": "distill"})
    assert [job.fuse_method for job in jobs] == ["distill", "distill"]
    for method, default in (("advunlearn", "distill"), ("esd-x", "stack"), ("salun", "stack")):
        jobs, _ = plan_jobs({"method": method, "concept": ["circle", "star"], "fuse": "f.safetensors"})
        assert {job.fuse_method for job in jobs} == {default}
    for method in ("esd-x", "esd-u", "salun", "spm", "uce"):
        with pytest.raises(ConfigError, match=f"fuse_method distill fuses text-encoder adapters, but {method} "):
            plan_jobs({"method": method, "concept": ["circle", "star"], "fuse": "f.safetensors",
                       "fuse_method": "distill"})
