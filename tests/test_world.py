import numpy as np
import pytest

from unsee.toy import model as toy
from unsee.toy import world


def test_renderer_is_deterministic_for_a_seed():
    a = list(world.sample_dataset(seed=7, n=20))
    b = list(world.sample_dataset(seed=7, n=20))
    for (img_a, cap_a, scene_a), (img_b, cap_b, scene_b) in zip(a, b):
        assert np.array_equal(img_a, img_b)
        assert cap_a == cap_b and scene_a == scene_b
    c = list(world.sample_dataset(seed=8, n=20))
    assert any(not np.array_equal(x[0], y[0]) for x, y in zip(a, c))


def test_render_shape_and_colours():
    rng = np.random.default_rng(0)
    scene = world.sample_scene(rng, shape="square", color="red", background="white", style="solid")
    image = world.render(scene)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == world.BACKGROUND_RGB["white"]
    assert tuple(image[int(scene.cy), int(scene.cx)]) == world.COLOR_RGB["red"]
    empty = world.render(world.sample_scene(rng, shape="none", background="gray"))
    assert (empty == np.array(world.BACKGROUND_RGB["gray"], dtype=np.uint8)).all()


def test_world_has_the_promised_variety():
    assert len(world.SHAPES) >= 6 and len(world.COLORS) >= 6 and len(world.BACKGROUNDS) >= 3
    assert world.STYLES == ("solid", "striped")
    captions = {cap for _, cap, _ in world.sample_dataset(seed=0, n=400)}
    assert any("ball" in c for c in captions), "synonyms are used"
    assert any(c.count(" ") <= 2 for c in captions), "some captions name only some attributes"
    assert world.prompt_for(shape="circle", color="red", background="gray") == "a red circle on a gray background"
    assert world.prompt_for(shape="circle", color="orange") == "an orange circle"
    with pytest.raises(ValueError, match="no prompt template"):
        world.prompt_for(style="striped", background="gray")


def test_placement_is_random_within_the_documented_ranges_and_inside_the_frame():
    rng = np.random.default_rng(7)
    scenes = [world.sample_scene(rng, shape="star", background="black", color="red", style="solid") for _ in range(300)]
    sizes, angles = np.array([s.size for s in scenes]), np.array([s.angle for s in scenes])
    offsets = np.array([(s.cx - world.IMAGE_SIZE / 2, s.cy - world.IMAGE_SIZE / 2) for s in scenes])
    low, high = world.SIZE_RANGE
    assert low <= sizes.min() and sizes.max() <= high and sizes.max() - sizes.min() > 0.8 * (high - low)
    assert np.abs(offsets).max() <= world.POSITION_JITTER and np.abs(offsets).max() > 0.8 * world.POSITION_JITTER
    assert np.abs(angles).max() <= world.MAX_ROTATION and np.ptp(angles) > 1.6 * world.MAX_ROTATION
    for scene in scenes[:40]:  # the shape never touches the border: the outermost pixels are background
        image = world.render(scene)
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (border == world.BACKGROUND_RGB["black"]).all()


def test_tokenizer_round_trip_offline(tmp_path):
    tokenizer = toy.build_tokenizer(world.vocabulary())
    assert tokenizer.model_max_length == toy.MAX_LENGTH
    for word in world.vocabulary():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    world_text = "a striped blue plus sign on a grey background"
    assert tokenizer.decode(tokenizer(world_text).input_ids, skip_special_tokens=True) == world_text
    other = "Unknown words, 42 and punctuation!"
    ids = tokenizer(other).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    # characters outside the world's vocabulary survive (CLIP decoding only re-spaces them)
    assert "".join(tokenizer.decode(ids, skip_special_tokens=True).split()) == "".join(other.lower().split())
    tokenizer.save_pretrained(tmp_path)
    from transformers import CLIPTokenizer

    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    text = "a red circle on a gray background"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.decode(loaded(text).input_ids, skip_special_tokens=True) == text
    padded = loaded(text, padding="max_length").input_ids
    assert len(padded) == toy.MAX_LENGTH


def test_tokenizer_is_the_same_in_every_process():
    """The merges and ids depend on the words only (the tiny test pipelines' embeddings follow the ids)."""
    import json
    import os
    import subprocess
    import sys

    probe = "from unsee.toy import model as toy, world; import json; t = toy.build_tokenizer(world.vocabulary()); print(json.dumps(t.get_vocab(), sort_keys=True))"
    here = json.dumps(toy.build_tokenizer(world.vocabulary()).get_vocab(), sort_keys=True)
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        there = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
        assert there.strip() == here


def test_tokenizer_refuses_words_it_cannot_keep_whole():
    with pytest.raises(ValueError, match="ASCII letters only"):
        toy.build_tokenizer(["circle", "r2d2"])  # CLIP's pre-tokenizer splits the digits off


# -- the toy preset's prompt sets (issue 23) -------------------------------------------------------

def _digest(prompts) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()[:16]


def test_the_toy_preset_gives_the_prompt_sets_the_trainers_drew_from_the_world():
    """SalUn's, ANT's and AdvUnlearn's sets on the toy model are exactly those their ``toy_world=True`` drew before
    the world left the trainers (digests of the lists that code gave, same seeds, sizes and order)."""
    from unsee.toy.presets import preset_settings, world_prompt_sets

    salun = preset_settings("toy", "salun", "toy", "circle")  # seed 0 (the config's), 128 and 128 (the preset's)
    assert (salun["forget_prompts"][0], salun["relabel_prompts"][0], salun["retain_prompts"][0]) == (
        "a green circle on a gray background", "a green square on a gray background",
        "a green square on a gray background")
    digests = [_digest(salun[key]) for key in ("forget_prompts", "relabel_prompts", "retain_prompts")]
    assert digests == ["6728c5526119d333", "c6a1de2d180543c8", "d6ef33d8d8e85bae"]
    # the user's seed and sizes count; a list the user gives is kept, and its prompts are the ones relabelled
    striped = preset_settings("toy", "salun", "toy", "striped", {"seed": 3, "num_retain": 64})
    assert [_digest(striped[key]) for key in ("forget_prompts", "relabel_prompts", "retain_prompts")] == [
        "5b3f88a8a9219585", "0812649d3d51b395", "b13c52935f8ffc38"]
    red = world_prompt_sets("salun", "red", {"seed": 1, "num_forget": 7, "num_retain": 5})
    assert [_digest(red[key]) for key in ("forget_prompts", "relabel_prompts", "retain_prompts")] == [
        "4e8f3d67fadc6f2b", "a8087f34fdce98c9", "efc0d1f5d8a327ec"]
    own = world_prompt_sets("salun", "circle", {"forget_prompts": ["a blue {concept}"], "retain_prompts": ["x"]})
    assert own == {"relabel_prompts": ["a blue square"]}

    assert preset_settings("toy", "ant", "toy", "circle")["saliency_prompts"] == ["circle", "ball", "disc"]
    assert preset_settings("toy", "ant", "toy", "Ball")["saliency_prompts"] == ["Ball", "circle", "disc"]
    assert preset_settings("toy", "ant", "toy", "plus")["saliency_prompts"] == ["plus", "cross", "plus sign"]
    assert preset_settings("toy", "ant", "toy", "striped")["saliency_prompts"] == ["striped"]

    for concept, seed, digest in (("circle", 0, "d4b8cf0f0a389917"), ("circle", 77, "00ec756ad50b9cfb"),
                                  ("striped", 1, "d0cb4f1c4da247a1")):
        retain = preset_settings("toy", "advunlearn", "toy", concept, {"seed": seed})["retain_prompts"]
        assert isinstance(retain, tuple) and len(retain) == 64 and _digest(retain) == digest

    # other models, other presets and concepts outside the world get no world prompts
    for model, preset, concept in (("some/model", "toy", "circle"), ("toy", "paper", "circle"), ("toy", "toy", "cat")):
        for method in ("salun", "ant", "advunlearn"):
            settings = preset_settings(preset, method, model, concept)
            assert not {"forget_prompts", "relabel_prompts", "retain_prompts", "saliency_prompts"} & set(settings)


def test_esd_x_strict_takes_its_own_toy_rates_for_shapes_and_styles_and_esd_x_keeps_its_own():
    """ESD-x-strict's shape, colour and style rates are its own (TOY_ESD_X_STRICT_BY_ATTRIBUTE), in one-concept runs
    and in runs of several; backgrounds, the in-context prompts and everything of ESD-x stay as they were."""
    from unsee.toy.presets import preset_settings

    def rates(method, concept, **settings):
        merged = preset_settings("toy", method, "toy", concept, settings)
        return merged["lr"], merged["eta"], len(merged.get("erase_from") or ()), len(merged.get("preserve") or ())

    assert [rates("esd-x", c) for c in ("circle", "red", "striped", "plain")] == [
        (5e-4, 2.0, 0, 0), (2e-4, 1.0, 0, 0), (2e-3, 3.0, 16, 10), (5e-4, 2.0, 0, 0)]
    assert [rates("esd-x-strict", c) for c in ("circle", "red", "striped", "plain", "cat")] == [
        (1e-3, 2.0, 0, 0), (4e-4, 2.0, 0, 0), (4e-3, 3.0, 16, 10), (5e-4, 2.0, 0, 0), (5e-4, 2.0, 0, 0)]
    # several concepts: the first concept's rates, and the style's in-context prompts as its own run gets them
    assert rates("esd-x-strict", "circle", concepts=["striped"])[:2] == (1e-3, 2.0)
    erase_from, preserve = rates("esd-x-strict", "circle", concepts=["striped"])[2:]
    assert 0 < erase_from <= 16 and 0 < preserve <= 10  # striped's, less those naming circle
    # the user's own settings win
    assert rates("esd-x-strict", "star", lr=3e-4)[0] == 3e-4
    assert preset_settings("paper", "esd-x-strict", "toy", "circle").get("lr") is None


def test_esd_x_in_one_run_of_several_concepts_erases_each_in_context_with_its_siblings_preserved():
    """TOY_ESD_X_SEVERAL: whatever the first concept, one rate and eta, every concept's world prompts (each prompt
    once, given to the first concept it names) and its siblings' (none naming an erased concept); one concept's run
    is unchanged."""
    from unsee.erasure.config import names_concept
    from unsee.toy.presets import TOY_ESD_X_SEVERAL, preset_settings

    four = ["circle", "star", "red", "striped"]
    for order in (four, four[::-1]):
        merged = preset_settings("toy", "esd-x", "toy", order[0], {"concepts": order[1:]})
        assert (merged["lr"], merged["eta"]) == (TOY_ESD_X_SEVERAL["lr"], TOY_ESD_X_SEVERAL["eta"]) == (5e-4, 3.0)
        erase_from, preserve = merged["erase_from"], merged["preserve"]
        assert len(set(erase_from)) == len(erase_from) and len(set(preserve)) == len(preserve) >= 10
        for index, concept in enumerate(order):
            mine = [p for p in erase_from if next(c for c in order if names_concept(p, c)) == concept]
            assert 5 <= len(mine) <= 16 and all(not names_concept(p, c) for p in mine for c in order[:index])
        assert not any(names_concept(p, c) for p in preserve for c in four)
    assert preset_settings("toy", "esd-x", "toy", "circle") == {"steps": 200, "lr": 5e-4, "eta": 2.0, "ddim_steps": 25}
    assert preset_settings("toy", "esd-x", "toy", "circle", {"concepts": ["star"], "eta": 1.5})["eta"] == 1.5


def test_spm_preserves_the_other_colours_when_it_erases_a_colour_alone():
    """SPM's toy preset anchors 10 prompts of the other colours for a colour (TOY_IN_CONTEXT_BY_ATTRIBUTE), none for
    other attributes, and none in a run of several concepts (TOY_SPM_SEVERAL was tuned without)."""
    from unsee.toy import world
    from unsee.toy.presets import preset_settings

    red = preset_settings("toy", "spm", "toy", "red")
    assert len(red["erase_from"]) == 16 and len(red["preserve"]) == 10
    colours = {world.parse_prompt(p)["color"] for p in red["preserve"]}
    assert "red" not in colours and len(colours) == 5
    assert [preset_settings("toy", "spm", "toy", c).get("preserve") for c in ("circle", "striped", "plain")] == [
        None, None, None]
    for first, more in (("circle", ["red"]), ("red", ["circle"])):
        assert preset_settings("toy", "spm", "toy", first, {"concepts": more})["preserve"] == ()
    assert preset_settings("toy", "spm", "toy", "red", {"preserve": ["a blue star"]})["preserve"] == ["a blue star"]
    assert "preserve" not in preset_settings("toy", "spm", "sd15", "red")
