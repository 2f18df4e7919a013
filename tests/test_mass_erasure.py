"""Mass erasure: several concepts in one ESD/SPM run, ``--concepts FILE``, and fusing adapters (``unsee fuse``)."""

from __future__ import annotations

import json

import pytest
import torch

from unsee.adapters import Adapter, AdapterError, component_fingerprint, load_adapter
from unsee.cli import UsageError, build_parser, main
from unsee.erasure import ConfigError, make_trainer
from unsee.fuse import fuse_adapters, lora_to_delta
from unsee.jobs import plan_jobs, read_concepts_file, run_jobs
from unsee.testing import tiny_sd_pipeline

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
CONV = "down_blocks.0.resnets.0.conv1"  # (16, 16, 3, 3)
MID_K = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"  # (32, 16)
TE_K = "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def _fingerprint(pipe, *components):
    return {c: component_fingerprint(getattr(pipe, c)) for c in components}


def _lora(pipe, modules, rank, alpha, seed, concept, method="esd-x"):
    """A LoRA adapter on ``modules`` (name -> (out, in[, kh, kw])) with random factors."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in modules.items():
        out, rest = shape[0], shape[1:]
        tensors[f"unet.{name}.lora_A.weight"] = torch.randn((rank, *rest), generator=generator) * 0.1
        b_shape = (out, rank, 1, 1) if len(shape) == 4 else (out, rank)
        tensors[f"unet.{name}.lora_B.weight"] = torch.randn(b_shape, generator=generator) * 0.1
    return Adapter(kind="lora", method=method, concepts=[concept], tensors=tensors,
                   fingerprint=_fingerprint(pipe, "unet"), rank=rank, alpha=alpha)


def _delta(pipe, names, seed, concept, component="unet", kind="delta"):
    generator = torch.Generator().manual_seed(seed)
    params = dict(getattr(pipe, component).named_parameters())
    tensors = {f"{component}.{n}": torch.randn(params[n].shape, generator=generator) * 0.01 for n in names}
    return Adapter(kind=kind, method="esd-u", concepts=[concept], tensors=tensors,
                   fingerprint=_fingerprint(pipe, component))


def _effective(pipe):
    """Every weight of the UNet and the text encoder as the forward pass sees it: peft LoRA layers' base weight plus
    their active adapters' deltas; other parameters as they are."""
    weights = {}
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        for name, param in model.named_parameters():
            if ".lora_" not in name:
                weights[f"{component}.{name.replace('.base_layer.', '.')}"] = param.detach().clone()
        for name, module in model.named_modules():
            if hasattr(module, "base_layer") and hasattr(module, "lora_A"):
                weight = module.base_layer.weight.detach().clone()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter)
                weights[f"{component}.{name}.weight"] = weight
    return weights


def _weights_with(pipe, adapters):
    names = [pipe.load_erasure(a, adapter_name=f"a{i}") for i, a in enumerate(adapters)]
    try:
        return _effective(pipe)
    finally:
        for name in names:
            pipe.unload_erasure(name)


def _assert_same_weights(pipe, separate, fused):
    expected = _weights_with(pipe, separate)
    got = _weights_with(pipe, [fused])
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.allclose(got[key], expected[key], rtol=0, atol=1e-6), key
    return expected


# ------------------------------------------------------------------------------ fuse: stack


def test_lora_plus_lora_concatenates_ranks_exactly_with_different_alphas(pipe, tmp_path):
    a = _lora(pipe, {f"{ATTN}.to_k": (16, 16), CONV: (16, 16, 3, 3)}, rank=2, alpha=1.0, seed=1, concept="circle")
    b = _lora(pipe, {f"{ATTN}.to_k": (16, 16), MID_K: (32, 16)}, rank=3, alpha=6.0, seed=2, concept="star")
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    fused = fuse_adapters([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])
    assert fused.kind == "lora" and fused.rank == 5 and fused.alpha == 5.0 and fused.scaling == 1.0
    assert fused.concepts == ["circle", "star"] and fused.method == "esd-x"
    assert fused.hyperparameters["fuse"] == "stack" and len(fused.hyperparameters["sources"]) == 2
    # the product of the fused factors is the sum of the sources' scaled products, module by module
    for module, sources in ((f"{ATTN}.to_k", (a, b)), (CONV, (a,)), (MID_K, (b,))):
        want = sum(lora_to_delta(s)[f"unet.{module}.weight"] for s in sources)
        got = lora_to_delta(fused)[f"unet.{module}.weight"]
        assert torch.allclose(got, want, atol=1e-7)
    fused.save(tmp_path / "ab.safetensors")
    base = _effective(pipe)
    stacked = _assert_same_weights(pipe, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
                                   tmp_path / "ab.safetensors")
    assert not torch.allclose(stacked[f"unet.{CONV}.weight"], base[f"unet.{CONV}.weight"])  # the check can fail


def test_delta_plus_delta_sums_exactly(pipe, tmp_path):
    a = _delta(pipe, [f"{ATTN}.to_k.weight", f"{ATTN}.to_out.0.bias"], seed=1, concept="circle")
    b = _delta(pipe, [f"{ATTN}.to_k.weight", f"{CONV}.weight"], seed=2, concept="red")
    fused = fuse_adapters([a, b])
    assert fused.kind == "delta" and set(fused.tensors) == set(a.tensors) | set(b.tensors)
    key = f"unet.{ATTN}.to_k.weight"
    assert torch.equal(fused.tensors[key], a.tensors[key] + b.tensors[key])
    stacked = _assert_same_weights(pipe, [a, b], fused)
    assert not torch.equal(stacked[key], _effective(pipe)[key])


def test_lora_plus_delta_becomes_the_exact_delta(pipe):
    a = _lora(pipe, {f"{ATTN}.to_k": (16, 16), CONV: (16, 16, 3, 3)}, rank=2, alpha=4.0, seed=3, concept="circle")
    b = _delta(pipe, [f"{ATTN}.to_k.weight"], seed=4, concept="star")
    fused = fuse_adapters([a, b])
    assert fused.kind == "delta" and fused.hyperparameters["lora_converted_to_delta"] is True
    assert fused.tensors[f"unet.{CONV}.weight"].shape == (16, 16, 3, 3)
    _assert_same_weights(pipe, [a, b], fused)


def test_text_encoder_adapters_sum_to_a_text_encoder_adapter(pipe):
    names = ["text_model.encoder.layers.0.self_attn.k_proj.weight", "text_model.encoder.layers.1.mlp.fc1.weight"]
    params = dict(pipe.text_encoder.named_parameters())
    names = [n if n in params else n.removeprefix("text_model.") for n in names]
    a = _delta(pipe, names[:1], seed=5, concept="circle", component="text_encoder", kind="text_encoder")
    b = _delta(pipe, names, seed=6, concept="star", component="text_encoder", kind="text_encoder")
    fused = fuse_adapters([a, b])
    assert fused.kind == "text_encoder" and fused.components == ["text_encoder"]
    _assert_same_weights(pipe, [a, b], fused)


def test_adapters_of_different_models_are_refused(pipe):
    a = _delta(pipe, [f"{ATTN}.to_k.weight"], seed=1, concept="circle")
    b = _delta(pipe, [f"{ATTN}.to_k.weight"], seed=2, concept="star")
    b.fingerprint = {"unet": "0123456789abcdef"}
    with pytest.raises(AdapterError, match="different base models.*0123456789abcdef"):
        fuse_adapters([a, b])


@pytest.mark.parametrize("sources, message", [((), "at least two"), (("a",), "at least two"),
                                              (("a", "a"), "given twice")])
def test_fewer_than_two_adapters_or_one_twice_is_refused(pipe, tmp_path, sources, message):
    _delta(pipe, [f"{ATTN}.to_k.weight"], seed=1, concept="circle").save(tmp_path / "a.safetensors")
    with pytest.raises(AdapterError, match=message):
        fuse_adapters([tmp_path / f"{s}.safetensors" for s in sources])


def test_cli_fuse_end_to_end(pipe, tmp_path, capsys):
    a = _lora(pipe, {f"{ATTN}.to_v": (16, 16)}, rank=1, alpha=1.0, seed=7, concept="circle", method="spm")
    b = _lora(pipe, {f"{ATTN}.to_v": (16, 16)}, rank=2, alpha=0.5, seed=8, concept="star", method="spm")
    paths = [a.save(tmp_path / "a.safetensors"), b.save(tmp_path / "b.safetensors")]
    out = tmp_path / "ab.safetensors"
    assert main(["fuse", *map(str, paths), "--out", str(out)]) == 0
    assert "fused 2 adapters" in capsys.readouterr().out
    fused = load_adapter(out)
    assert fused.rank == 3 and fused.concepts == ["circle", "star"] and fused.method == "spm"
    expected = fuse_adapters(paths)
    assert all(torch.equal(fused.tensors[k], expected.tensors[k].float()) for k in expected.tensors)
    _assert_same_weights(pipe, paths, out)
    before = out.read_bytes()
    # an existing --out without --overwrite, and adapters of another model: one-line errors, nothing written
    assert main(["fuse", *map(str, paths), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    other = _lora(pipe, {f"{ATTN}.to_v": (16, 16)}, rank=1, alpha=1.0, seed=9, concept="red")
    other.fingerprint = {"unet": "fedcba9876543210"}
    other.save(tmp_path / "other.safetensors")
    other_path, x = str(tmp_path / "other.safetensors"), str(tmp_path / "x.safetensors")
    assert main(["fuse", str(paths[0]), other_path, "--out", x]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different base models" in err
    assert not (tmp_path / "x.safetensors").exists() and out.read_bytes() == before
    assert main(["fuse", str(paths[0]), "--out", str(tmp_path / "y.safetensors")]) == 2
    assert "at least two" in capsys.readouterr().err


# ------------------------------------------------------------------------------ fuse: MACE


def _kv_lora(pipe, seed, concept, modules=(f"{ATTN}.to_k", MID_K), rank=1, alpha=1.0):
    shapes = {name: tuple(dict(pipe.unet.named_modules())[name].weight.shape) for name in modules}
    return _lora(pipe, shapes, rank=rank, alpha=alpha, seed=seed, concept=concept, method="esd-x-strict")


def test_mace_fusion_solves_its_least_squares_problem(pipe):
    a, b = _kv_lora(pipe, 1, "circle", rank=2, alpha=4.0), _kv_lora(pipe, 2, "star", modules=(f"{ATTN}.to_k",))
    generator = torch.Generator().manual_seed(0)
    columns = [torch.randn(16, 3, generator=generator, dtype=torch.float64) for _ in range(2)]
    keep = torch.randn(16, 2, generator=generator, dtype=torch.float64)
    lamb, scale = 0.3, 2.0
    from unsee.fuse import mace_fuse

    fused = mace_fuse([a, b], columns, keep, lamb=lamb, preserve_scale=scale)
    assert fused.kind == "lora" and fused.rank == 6 and fused.concepts == ["circle", "star"]
    assert fused.hyperparameters["fuse"] == "mace"
    modules = dict(pipe.unet.named_modules())
    for module in (f"{ATTN}.to_k", MID_K):
        key = f"unet.{module}.weight"
        w0 = modules[module].weight.detach().double()
        targets = [w0 + lora_to_delta(s)[key].double() if key in lora_to_delta(s) else w0 for s in (a, b)]
        w = w0 + lora_to_delta(fused)[key].double()
        # the gradient of sum_i |W C_i - W_i C_i|^2 + lamb |W - W0|^2 + s |W P - W0 P|^2 vanishes at the solution
        gradient = (sum((w - t) @ c @ c.T for t, c in zip(targets, columns)) + lamb * (w - w0)
                    + scale * (w - w0) @ keep @ keep.T)
        assert gradient.abs().max() < 1e-5 * w.abs().max()
        # and the refit is not the stacked sum (the check can fail)
        stacked = w0 + sum(t - w0 for t in targets)
        assert not torch.allclose(w, stacked, atol=1e-4)
    # it loads and applies like any LoRA adapter
    weights = _weights_with(pipe, [fused])
    assert torch.allclose(weights[f"unet.{MID_K}.weight"], modules[MID_K].weight.detach() +
                          lora_to_delta(fused)[f"unet.{MID_K}.weight"], atol=1e-6)


def test_mace_blocks_of_prompts_naming_several_concepts_keep_their_sources_summed(pipe):
    a, b = _kv_lora(pipe, 5, "circle"), _kv_lora(pipe, 6, "star", modules=(f"{ATTN}.to_k",))
    generator = torch.Generator().manual_seed(1)
    columns = [torch.randn(16, 3, generator=generator, dtype=torch.float64) for _ in range(2)]
    both = torch.randn(16, 4, generator=generator, dtype=torch.float64)
    keep = torch.randn(16, 2, generator=generator, dtype=torch.float64)
    from unsee.fuse import mace_fuse

    fused = mace_fuse([a, b], columns, keep, lamb=0.2, preserve_scale=1.5, together=[(both, (0, 1))])
    assert fused.rank == 10
    w0 = dict(pipe.unet.named_modules())[f"{ATTN}.to_k"].weight.detach().double()
    key = f"unet.{ATTN}.to_k.weight"
    deltas = [lora_to_delta(s)[key].double() for s in (a, b)]
    w = w0 + lora_to_delta(fused)[key].double()
    # the block's target is both changes at once: W both = (W0 + dA + dB) both at the minimum
    targets = [(w0 + deltas[0], columns[0]), (w0 + deltas[1], columns[1]), (w0 + deltas[0] + deltas[1], both)]
    gradient = (sum((w - t) @ c @ c.T for t, c in targets) + 0.2 * (w - w0) + 1.5 * (w - w0) @ keep @ keep.T)
    assert gradient.abs().max() < 1e-5 * w.abs().max()
    without = w0 + lora_to_delta(mace_fuse([a, b], columns, keep, lamb=0.2, preserve_scale=1.5))[key].double()
    assert not torch.allclose(w, without, atol=1e-4)
    with pytest.raises(AdapterError, match="names sources \\[0, 2\\]"):
        mace_fuse([a, b], columns, keep, together=[(both, (0, 2))])


def test_mace_refits_each_adapter_on_the_prompts_it_erases(pipe):
    from unsee.fuse import erased_prompts

    a, b = _kv_lora(pipe, 7, "circle"), _kv_lora(pipe, 8, "red")
    a.hyperparameters = {"templates": ["{concept}", "a {concept}"]}
    b.hyperparameters = {"erase_from": ["a red square", "a red circle"]}
    assert erased_prompts(a) == ["circle", "a circle"]
    assert erased_prompts(b) == ["red", "a red square", "a red circle"]
    seen = []

    def embed(texts):
        seen.append(list(texts))
        return torch.randn(len(texts), 2, 16, generator=torch.Generator().manual_seed(len(seen)))

    fused = fuse_adapters([a, b], method="mace", embed=embed, preserve=["", "a blue square"],
                          prompts={"circle": ["a blue circle", "a Red Circle"]})
    # each adapter's own prompts; "a red circle" and "a Red Circle" name both concepts: a block of their own
    assert fused.hyperparameters["refit_prompts"] == [["circle", "a circle", "a blue circle"], ["red", "a red square"]]
    assert fused.hyperparameters["refit_together"] == [{"sources": [0, 1], "prompts": ["a Red Circle", "a red circle"]}]
    assert ["a Red Circle", "a red circle"] in seen and fused.rank == 2 * (3 + 2 + 2)
    with pytest.raises(AdapterError, match="prompts are given for 'star', which none of the adapters erases"):
        fuse_adapters([a, b], method="mace", embed=embed, prompts={"star": ["a star"]})
    with pytest.raises(AdapterError, match=r"prompts\['circle'\] must be a list"):
        fuse_adapters([a, b], method="mace", embed=embed, prompts={"circle": "a circle"})


def test_mace_refuses_adapters_of_other_modules(pipe):
    from unsee.fuse import mace_fuse

    a = _kv_lora(pipe, 1, "circle")
    b = _kv_lora(pipe, 2, "star", modules=(f"{ATTN}.to_q",))
    columns = [torch.randn(16, 2, dtype=torch.float64)] * 2
    with pytest.raises(AdapterError, match="adapter 2 changes .*cross-attention keys and values"):
        mace_fuse([a, b], columns, torch.randn(16, 1, dtype=torch.float64))
    with pytest.raises(AdapterError, match="needs embed="):
        fuse_adapters([a, a], method="mace")


def test_cli_mace_fuse_end_to_end(tiny_sd_folder, tmp_path, capsys):
    from unsee.loading import load_pipeline

    model = load_pipeline(str(tiny_sd_folder))
    paths = [_kv_lora(model, 3, "circle").save(tmp_path / "a.safetensors"),
             _kv_lora(model, 4, "star").save(tmp_path / "b.safetensors")]
    out = tmp_path / "mace.safetensors"
    assert main(["fuse", *map(str, paths), "--out", str(out), "--method", "mace", "--model", str(tiny_sd_folder),
                 "--preserve", "", "--preserve", "a red square", "--lamb", "0.1"]) == 0
    fused = load_adapter(out)
    assert fused.concepts == ["circle", "star"] and fused.hyperparameters["fuse"] == "mace"
    assert fused.hyperparameters["preserve"] == ["", "a red square"] and fused.hyperparameters["lamb"] == 0.1
    assert fused.kind == "delta"  # 77 token columns per concept reach the tiny model's width of 16
    assert fused.hyperparameters["refit_prompts"] == [["circle"], ["star"]]  # no toy preset for another model
    model.load_erasure(out)
    capsys.readouterr()
    # --template fills each concept into prompts the refit keeps erased
    assert main(["fuse", *map(str, paths), "--out", str(out), "--overwrite", "--method", "mace", "--model",
                 str(tiny_sd_folder), "--template", "a photo of {concept}"]) == 0
    assert load_adapter(out).hyperparameters["refit_prompts"] == [["circle", "a photo of circle"],
                                                                   ["star", "a photo of star"]]
    capsys.readouterr()
    before = out.read_bytes()
    assert main(["fuse", *map(str, paths), "--out", str(out), "--overwrite", "--method", "mace", "--model",
                 str(tiny_sd_folder), "--template", "a photo"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--template 'a photo' has no {concept}" in err and out.read_bytes() == before
    # --model with the stack fusion is refused in one line
    assert main(["fuse", *map(str, paths), "--out", str(tmp_path / "x.safetensors"), "--model", "toy"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--model is for --method mace" in err


# ------------------------------------------------------------------------------ ESD and SPM: several concepts

FAST = dict(steps=4, ddim_steps=2, lr=1e-3, seed=0)


@pytest.mark.parametrize("method, settings", [("esd-x", {}), ("spm", {"lr": 1e-2, "anchors": 1})])
def test_two_concepts_train_one_adapter_and_every_step_draws_one(method, settings, monkeypatch):
    trainer = make_trainer(method, concept="circle", concepts=["star"], **{**FAST, **settings})
    drawn = []
    original = type(trainer).draw_concept

    def spy(self, step):
        original(self, step)
        index = next(i for i, p in enumerate(self.concept_prompts) if p is self.prompts)
        drawn.append(self.config.erased[index])

    monkeypatch.setattr(type(trainer), "draw_concept", spy)
    adapter = trainer.train(tiny_sd_pipeline())
    monkeypatch.undo()
    assert adapter.concepts == ["circle", "star"]
    assert list(adapter.hyperparameters["concepts"]) == ["star"]
    assert len(drawn) == FAST["steps"] and sorted(drawn) == ["circle", "circle", "star", "star"]  # balanced
    assert adapter.training["concept_draws"] == {c: drawn.count(c) for c in ("circle", "star")}
    # the draws come from the seed: the same run draws the same concepts
    again = make_trainer(method, concept="circle", concepts=["star"], **{**FAST, **settings}).train(tiny_sd_pipeline())
    assert again.training["concept_draws"] == adapter.training["concept_draws"]
    assert all(torch.equal(again.tensors[k], adapter.tensors[k]) for k in adapter.tensors)


@pytest.mark.parametrize("method, name, extra", [("spm", "guidance", {"lr": 1e-2, "anchors": 1}),
                                                 ("esd-u", "eta", {})])
def test_guidance_per_concept(method, name, extra, monkeypatch):
    # SPM's guidance and ESD's eta: a list gives each erased concept its own
    import importlib

    module = importlib.import_module(f"unsee.erasure.{method.split('-')[0]}")
    trainer_class = type(make_trainer(method, concept="circle"))
    settings = dict(concept="circle", concepts=["star"], **{**FAST, **extra})
    one = make_trainer(method, **{name: 3.0}, **settings).train(tiny_sd_pipeline())
    same = make_trainer(method, **{name: [3.0, 3.0]}, **settings).train(tiny_sd_pipeline())
    assert all(torch.equal(one.tensors[k], same.tensors[k]) for k in one.tensors)  # a list of equal values: the same run
    used, drawn = [], []
    target, draw = module.esd_target, trainer_class.draw_concept

    def spy_draw(self, position):
        draw(self, position)
        drawn.append(self.config.erased[self.concept_index])

    monkeypatch.setattr(module, "esd_target", lambda *a: used.append(a[3]) or target(*a))
    monkeypatch.setattr(trainer_class, "draw_concept", spy_draw)
    adapter = make_trainer(method, **{name: [1.0, 5.0]}, **settings).train(tiny_sd_pipeline())
    assert sorted(drawn) == ["circle", "circle", "star", "star"]
    assert used == [{"circle": 1.0, "star": 5.0}[c] for c in drawn]  # each step: its concept's value
    assert list(adapter.hyperparameters[name]) == [1.0, 5.0]
    for bad, message in [([1.0], f"{name} has 1 entry for 2 erased concepts; give one value, or one per concept"),
                         ([1.0, "x"], "must be a finite number, or a list of them with one per erased concept, "
                                      "got [1.0, 'x']")]:
        with pytest.raises(ConfigError) as error:
            make_trainer(method, **{**settings, name: bad})
        text = str(error.value)
        assert text.startswith(name) and message in text and "\n" not in text


def test_concept_cycles_cover_every_concept_equally_and_follow_the_seed():
    trainer = make_trainer("esd-x", concept="circle", concepts=["star", "red"], seed=3)
    trainer._draws_total = 2  # e.g. draws_per_step=2: positions run step by step, draw by draw

    def order(trainer, steps=12):
        picked = []
        for step in range(steps):
            for draw in range(2):
                trainer._draw_number = draw
                picked.append(trainer.cycle_index(step, 3))
        return picked

    picked = order(trainer)
    assert all(sorted(picked[i:i + 3]) == [0, 1, 2] for i in range(0, len(picked), 3))  # every cycle: each once
    assert len({tuple(picked[i:i + 3]) for i in range(0, len(picked), 3)}) > 1  # shuffled, not round robin
    assert order(trainer) == picked
    other = make_trainer("esd-x", concept="circle", concepts=["star", "red"], seed=4)
    other._draws_total = 2
    assert order(other) != picked
    assert trainer.cycle_index(5, 1) == 0


# the losses of single-concept runs as the code before mass erasure gave them (3 steps on the tiny pipeline): a
# concept draw in a single-concept step would change the random stream, and with it every loss after the first
SINGLE = {
    "esd-x": (dict(concept="circle", steps=3, ddim_steps=3, lr=1e-3),
              [0.0007916141184978187, 0.0003090347454417497, 0.0002876281796488911]),
    "esd-u": (dict(concept="circle", steps=3, ddim_steps=3, lr=1e-3,
                   erase_from=["a red circle", "a blue circle on black"], preserve=["a square", "a star"]),
              [0.0002128510532202199, 0.0403444841504097, 0.01905992440879345]),
    "spm": (dict(concept="circle", steps=3, ddim_steps=3, lr=1e-2),
            [0.0007593589834868908, 0.06310872733592987, 0.01255480945110321]),
}


# the sum of the tiny pipeline's weights the losses were pinned on: other diffusers/transformers releases initialise
# the tiny components differently, and there the pinned losses say nothing
PINNED_WEIGHTS_SUM = 1549.6240573654438


@pytest.mark.parametrize("method", sorted(SINGLE))
def test_single_concept_runs_are_unchanged(method):
    settings, losses = SINGLE[method]
    pipe = tiny_sd_pipeline()
    weights_sum = sum(float(t.double().sum()) for m in (pipe.unet, pipe.text_encoder, pipe.vae)
                      for t in m.state_dict().values())
    if weights_sum != pytest.approx(PINNED_WEIGHTS_SUM, rel=1e-9):
        pytest.skip("these library releases build other tiny weights than the ones the losses were pinned on")
    adapter = make_trainer(method, **settings).train(pipe)
    assert adapter.concepts == ["circle"] and "concept_draws" not in adapter.training
    assert adapter.training["losses"] == pytest.approx(losses, rel=1e-3)


def test_erase_from_prompts_go_to_the_concept_they_name():
    from unsee.erasure.config import contexts_by_concept

    prompts = ["a red circle", "a striped star", "a star and a circle"]
    assert contexts_by_concept(["circle", "star"], prompts) == [("a red circle", "a star and a circle"),
                                                                ("a striped star",)]
    assert contexts_by_concept(["hat"], "cowboy") == [("cowboy",)]  # one concept: every prompt, named or not
    with pytest.raises(ConfigError, match="'a cowboy' names none of the erased concepts"):
        make_trainer("esd-u", concept="circle", concepts=["star"], erase_from=["a cowboy"])
    with pytest.raises(ConfigError, match="'Circle' is erased twice"):
        make_trainer("spm", concept="circle", concepts=["Circle"])


# ------------------------------------------------------------------------------ --concepts FILE and the job runner


def test_concepts_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "concepts.txt"
    path.write_text("\ufeff# shapes\ncircle\n\n  star  \n   # colours\nred\n", encoding="utf-8")
    assert read_concepts_file(path) == ["circle", "star", "red"]


@pytest.mark.parametrize("text, message", [
    (None, "no such file"),
    ("# nothing\n\n", "lists no concept"),
    ("circle\nstar\nCircle\n", "'Circle' on line 3 is listed on line 1"),
    (b"\xff\xfe\x00c", "not UTF-8"),
])
def test_bad_concepts_files_are_refused_in_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "concepts.txt"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_concepts_file(path)
    assert main(["erase", "--method", "esd-x", "--concepts", str(path), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.split("'")[0] in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["concepts.txt"] if text is not None else [])


def _erase_config(argv):
    from unsee.cli import _erase_config

    return _erase_config(build_parser().parse_args(["erase", *argv]))


def test_concepts_flag_plans_one_native_run_or_fused_runs(tmp_path, tiny_sd_folder):
    path = tmp_path / "concepts.txt"
    path.write_text("star\nred\n")
    common = ["--model", str(tiny_sd_folder), "--grid", "0"]
    config = _erase_config(["--method", "esd-x", "--concept", "circle", "--concepts", str(path), *common])
    assert config["concept"] == "circle" and config["concepts"] == ["star", "red"] and "fuse" not in config
    (job,), _ = plan_jobs({**config, "out_dir": str(tmp_path)})
    assert job.config.erased == ["circle", "star", "red"] and job.out.name == "esd-x-circle-star-red.safetensors"
    # ANT erases one concept per run: one job per concept, the adapters fused into --out
    out = tmp_path / "sub" / "ant-many.safetensors"
    config = _erase_config(["--method", "ant", "--concepts", str(path), "--out", str(out), *common])
    assert config["concept"] == ["star", "red"] and config["fuse"] == str(out)
    jobs, report = plan_jobs(config)
    assert [j.config.concept for j in jobs] == ["star", "red"] and all(j.fuse_into == out for j in jobs)
    assert [j.out.parent for j in jobs] == [out.parent] * 2 and report == out.with_suffix(".json")
    with pytest.raises(UsageError, match="'star' is given twice"):  # on the command line and in the file
        _erase_config(["--method", "esd-x", "--concept", "star", "--concepts", str(path), *common])
    assert main(["erase", "--config", str(path), "--concepts", str(path)]) == 2


def test_a_job_list_fused_into_one_file(tmp_path, tiny_sd_folder):
    fused = tmp_path / "esd-x-circle-star.safetensors"
    config = {"model": str(tiny_sd_folder), "method": "esd-x", "concept": ["circle", "star"], "steps": 1,
              "ddim_steps": 1, "grid": 0, "device": "cpu", "out_dir": str(tmp_path), "fuse": str(fused)}
    report = run_jobs(config)
    assert report["fused"]["out"] == str(fused) and len(report["fused"]["from"]) == 2
    parts = [load_adapter(p) for p in report["fused"]["from"]]
    adapter = load_adapter(fused)
    assert adapter.concepts == ["circle", "star"] and adapter.kind == "delta"
    for key, tensor in adapter.tensors.items():
        assert torch.allclose(tensor, sum(p.tensors[key] for p in parts), atol=1e-7)
    assert json.loads(fused.with_suffix(".json").read_text())["fused"]["out"] == str(fused)
    # the fused file exists now: the same run is refused before any training
    with pytest.raises(ConfigError, match="exists; pass --overwrite"):
        run_jobs(config)
    with pytest.raises(ConfigError, match="at least two jobs"):
        plan_jobs({**config, "concept": "circle", "fuse": str(tmp_path / "one.safetensors")})


def test_erase_fuse_mace_trains_one_run_per_concept_and_refits_them_together(tmp_path, tiny_sd_folder, capsys):
    from unsee.jobs import mace_options
    from unsee.loading import load_pipeline

    out = tmp_path / "kv.safetensors"
    common = ["--model", str(tiny_sd_folder), "--steps", "1", "--set", "ddim_steps=1", "--grid", "0"]
    assert main(["erase", "--method", "esd-x-strict", "--concept", "circle", "--concept", "star", "--fuse", "mace",
                 "--out", str(out), *common]) == 0
    assert f"fused 2 adapters into {out} (mace)" in capsys.readouterr().out
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["fused"]["fuse"] == "mace" and [j["concept"] for j in report["jobs"]] == ["circle", "star"]
    fused = load_adapter(out)
    assert fused.concepts == ["circle", "star"] and fused.hyperparameters["fuse"] == "mace"
    # the same as `unsee fuse --method mace` of the two runs' adapters
    model = load_pipeline(str(tiny_sd_folder))
    reference = fuse_adapters(report["fused"]["from"], method="mace",
                              **mace_options(model, str(tiny_sd_folder), ["circle", "star"]))
    assert fused.tensors.keys() == reference.tensors.keys()
    assert all(torch.equal(fused.tensors[k], reference.tensors[k]) for k in fused.tensors)
    capsys.readouterr()
    # one concept, or fuse_method without fuse, is refused before any work
    assert main(["erase", "--method", "esd-x-strict", "--concept", "circle", "--fuse", "mace",
                 "--out", str(tmp_path / "one.safetensors"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--fuse fuses the adapters of several concepts" in err
    with pytest.raises(ConfigError, match="fuse_method needs fuse"):
        plan_jobs({"method": "esd-x", "concept": ["circle", "star"], "fuse_method": "mace"})
    with pytest.raises(ConfigError, match="fuse_method: unknown method 'sum'"):
        plan_jobs({"method": "esd-x", "concept": ["circle", "star"], "fuse": "f.safetensors", "fuse_method": "sum"})
    # a method whose adapters change more than the keys and values is refused for MACE before any training
    assert main(["erase", "--method", "esd-x", "--concept", "circle", "--concept", "star", "--fuse", "mace",
                 "--out", str(tmp_path / "x.safetensors"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "esd-x 'circle'" in err and "use fuse_method stack" in err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x").exists()
    for method in ("spm", "advunlearn"):
        with pytest.raises(ConfigError, match=f"but {method} 'circle'.* trains an adapter that changes more"):
            plan_jobs({"method": method, "concept": ["circle", "star"], "fuse": "f.safetensors", "fuse_method": "mace"})
    assert len(plan_jobs({"method": "esd-x", "concept": ["circle", "star"], "fuse": "f.safetensors",
                          "fuse_method": "stack"})[0]) == 2


@pytest.mark.parametrize("method, settings", [
    ("uce", {}), ("esd-x-strict", {}), ("esd-x-strict", {"kind": "lora"}), ("esd-x", {}), ("esd-u", {}),
    ("spm", {}), ("ant", {"kind": "lora", "before_step": 1, "saliency_iterations": 1, "saliency_seeds": [0]}),
], ids=["uce", "esd-x-strict", "esd-x-strict-lora", "esd-x", "esd-u", "spm", "ant-lora"])
def test_text_kv_only_says_whether_the_adapter_changes_only_keys_and_values(method, settings):
    from unsee.fuse import MACE_MODULES

    sampled = {} if method == "uce" else {"ddim_steps": 2}
    trainer = make_trainer(method, concept="circle", steps=1, lr=1e-3, device="cpu", **sampled, **settings)
    adapter = trainer.train(tiny_sd_pipeline())
    tensors = lora_to_delta(adapter) if adapter.is_lora else adapter.tensors
    assert trainer.config.text_kv_only is all(k.startswith("unet.") and k.endswith(MACE_MODULES) for k in tensors)


def test_toy_mace_preset_refits_world_prompts_and_preserves_prompts_naming_none(tmp_path, capsys):
    from unsee.loading import load_pipeline
    from unsee.toy import world
    from unsee.toy.presets import TOY_MACE_PRESERVE, TOY_MACE_PROMPTS, fuse_settings

    settings = fuse_settings(["circle", "red", "not-in-the-world"])
    assert set(settings["prompts"]) == {"circle", "red"}
    for concept, prompts in settings["prompts"].items():
        assert len(prompts) == TOY_MACE_PROMPTS and all(world.parse_prompt(p)[world.concept_attribute(concept)[0]]
                                                        == concept for p in prompts)
    preserve = settings["preserve"]
    assert preserve[0] == "" and len(preserve) == 1 + TOY_MACE_PRESERVE
    assert not any(word in p.split() for p in preserve for word in ("circle", "red"))
    # the CLI applies it with the toy model
    toy = load_pipeline("toy")
    paths = [_kv_lora(toy, seed, concept, modules=(MID_K,)).save(tmp_path / f"{concept}.safetensors")
             for seed, concept in ((1, "circle"), (2, "red"))]
    out = tmp_path / "fused.safetensors"
    assert main(["fuse", *map(str, paths), "--out", str(out), "--method", "mace"]) == 0
    fused = load_adapter(out)
    assert fused.hyperparameters["preserve"] == fuse_settings(["circle", "red"])["preserve"]
    refitted = [p for texts in fused.hyperparameters["refit_prompts"] for p in texts]
    refitted += [p for block in fused.hyperparameters["refit_together"] for p in block["prompts"]]
    assert set(settings["prompts"]["circle"]) | set(settings["prompts"]["red"]) <= set(refitted)
    capsys.readouterr()
