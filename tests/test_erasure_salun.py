"""SalUn on the tiny pipeline: the saliency mask, masked training, prompts and compact masks."""

import math

import pytest
import torch

from unsee.erasure import ConfigError, SalUnConfig, SalUnTrainer, load_mask, pack_mask, save_mask, unpack_mask
from unsee.erasure.salun import saliency_prompts
from unsee.testing import train_on_tiny_pipeline

from unsee.toy import world


# the tiny pipeline is not the toy model: its prompt sets are given (toy-world prompts are for the toy model only)
TINY = dict(num_forget=4, num_retain=4, batch_size=2, generation_steps=3,
            forget_prompts=["a red circle", "a blue circle on a black background"],
            relabel_prompts=["a red square", "a blue square on a black background"],
            retain_prompts=["a green star", "a yellow heart", "a cross"])


def _train(fraction=0.5, steps=3, lr=1e-2, **extra):
    trainer = SalUnTrainer(SalUnConfig(concept="circle", steps=steps, lr=lr, mask_fraction=fraction, **TINY, **extra))
    pipe, adapter, originals, final = train_on_tiny_pipeline(trainer)
    return pipe, trainer, adapter, originals, final


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_mask_keeps_the_configured_fraction(fraction):
    _, trainer, adapter, originals, _ = _train(fraction=fraction, steps=1)
    total = sum(p.numel() for p in originals.values())
    kept = sum(int(m.sum()) for m in trainer.mask.values())
    assert set(trainer.mask) == set(originals)  # "full": every UNet parameter is a candidate
    assert abs(kept - fraction * total) <= 1
    assert adapter.training["mask_kept"] == kept and adapter.training["mask_candidates"] == total


def test_unmasked_weights_stay_bit_identical():
    pipe, trainer, adapter, originals, seen = _train()
    changed_somewhere = 0
    for name, mask in trainer.mask.items():
        trained = seen[name]
        # outside the mask: the exact original bits
        assert torch.equal(trained[~mask], originals[name][~mask]), name
        changed_somewhere += int((trained[mask] != originals[name][mask]).sum())
        key = f"unet.{name}"
        if mask.any():
            assert key in adapter.tensors
            assert not adapter.tensors[key][~mask].any()  # the delta is exactly zero outside the mask
        else:
            assert key not in adapter.tensors  # untouched tensors are left out
    assert changed_somewhere > 0.5 * sum(int(m.sum()) for m in trainer.mask.values())
    # the pipeline is handed back unchanged; the adapter loads
    assert all(torch.equal(p, originals[n]) for n, p in pipe.unet.named_parameters())
    pipe.load_erasure(adapter)
    pipe.unload_erasure()


def test_mask_is_stored_as_bits(tmp_path):
    mask = {"a": torch.rand(3, 5) > 0.5, "b.weight": torch.rand(17) > 0.3}
    packed = pack_mask(mask)
    assert all(bits.dtype == torch.uint8 and bits.numel() == math.ceil(m.numel() / 8)
               for bits, m in zip(packed["bits"].values(), mask.values()))
    assert all(torch.equal(a, b) for a, b in zip(unpack_mask(packed).values(), mask.values()))
    path = save_mask(mask, tmp_path / "m.mask.safetensors", metadata={"fraction": 0.5})
    loaded = load_mask(path)
    assert set(loaded) == set(mask) and all(torch.equal(loaded[k], mask[k]) for k in mask)
    assert path.stat().st_size < 1000


def test_toy_world_prompts_and_relabelling():
    from unsee.toy.presets import relabel_prompt

    assert relabel_prompt("a red circle on a gray background", "circle") == "a red square on a gray background"
    assert relabel_prompt("a heart on a white background", "white") == "a heart on a black background"
    world_forget = world.concept_prompts("red", 0, 6)  # the lists the toy preset gives
    config = SalUnConfig(concept="red", num_forget=6, num_retain=5, forget_prompts=world_forget,
                         relabel_prompts=[relabel_prompt(p, "red") for p in world_forget],
                         retain_prompts=world.other_prompts("red", 1, 5))
    forget, relabel, retain = saliency_prompts(config)
    assert forget == world_forget
    assert len(forget) == len(relabel) == 6 and len(retain) == 5
    assert all("red" in p for p in forget) and not any("red" in p for p in relabel + retain)


def test_explicit_prompts_for_concepts_outside_the_toy_world():
    with pytest.raises(ConfigError, match="relabel_prompts"):
        SalUnConfig(concept="nudity")
    with pytest.raises(ConfigError, match="relabel_prompts"):  # a toy-world word gets no toy prompts either
        SalUnConfig(concept="circle")
    config = SalUnConfig(concept="nudity", forget_prompts=["a photo of a nude person"],
                         relabel_prompts=["a photo of a person wearing clothes"], retain_prompts=["a photo of a car"],
                         num_forget=3, num_retain=2)
    forget, relabel, retain = saliency_prompts(config)
    assert forget == ["a photo of a nude person"] * 3 and relabel == ["a photo of a person wearing clothes"] * 3
    assert retain == ["a photo of a car"] * 2
    with pytest.raises(ConfigError, match="relabel_prompts needs"):
        SalUnConfig(concept="cat", forget_prompts=["a", "b"], relabel_prompts=["x", "y", "z"], retain_prompts=["r"])


def test_salun_defaults_are_the_papers():
    config = SalUnConfig(concept="circle", relabel_prompts=["a photo of a square"], retain_prompts=["a photo of a car"])
    assert (config.mask_fraction, config.alpha, config.lr, config.batch_size, config.mask_guidance) == (
        0.5, 0.5, 1e-5, 8, 7.5)
    assert config.parameters == "full" and config.num_forget == 800
    with pytest.raises(ConfigError, match="mask_fraction"):
        SalUnConfig(concept="circle", mask_fraction=0)
