"""Image metadata: A1111's ``parameters`` text chunk, written by ``unsee generate`` and read back by --from-png."""

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from unsee.cli import main
from unsee.png_metadata import (MetadataError, format_parameters, generation_options, generation_parameters,
                                guidance_options, parse_parameters, quote, read_parameters)

EXAMPLE = Path(__file__).resolve().parents[1] / "weights" / "examples" / "esd-x-circle.safetensors"


# ------------------------------------------------------------------------------------------------ text


@pytest.mark.parametrize("prompt, negative", [
    ("a red circle, on a gray background", None),
    ("a red circle", ""),
    ("two\nlines, of prompt", "blurry, low quality: 2\nsecond line"),
    ("  padded prompt  ", "  padded  "),
    ('quotes "inside", and: colons', 'a "b"'),
    ("ends with a newline\n", None),
    ("line one\nNegative prompt: this is still the prompt", None),  # would read back as a negative prompt
    ("line one\nNegative prompt: still the prompt", "the real negative"),
    ("日本語のプロンプト, ü", "ß"),
])
def test_prompt_and_settings_read_back_exactly(prompt, negative):
    settings = {"Steps": 3, "Sampler": "DDIM", "CFG scale": 7.5, "Seed": 4294967295, "Size": "32x48",
                "Model": "C:\\models\\sd, v1: 5.safetensors", "Adapter 1": "a, b.safetensors:0.5", "Empty": "",
                "Spaces": " x ", "Quote": '"q"'}
    text = format_parameters(prompt, negative, settings)
    info = parse_parameters(text)
    assert info.prompt == prompt and info.negative_prompt == negative
    assert info.settings == {key: str(value) for key, value in settings.items()}
    assert text.splitlines()[-1].startswith("Steps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 4294967295")


def test_values_are_quoted_as_a1111_quotes_them():
    assert quote("DDIM") == "DDIM" and quote(5.0) == "5.0" and quote(0.1 + 0.2) == "0.30000000000000004"
    assert quote("10,5") == '"10,5"' and quote("a: b") == '"a: b"' and quote("a\nb") == '"a\\nb"'
    assert quote((10.0, 5.0)) == '"10.0,5.0"'


def test_reads_automatic1111_text():
    text = ('masterpiece, 1girl\nNegative prompt: lowres, bad anatomy\nSteps: 20, Sampler: DPM++ 2M, Schedule type: '
            'Karras, CFG scale: 7, Seed: 1234, Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, '
            'Lora hashes: "foo: 1a2b3c, bar: 4d5e6f", Hires upscale, Version: v1.10.1')
    info = parse_parameters(text)
    assert info.prompt == "masterpiece, 1girl" and info.negative_prompt == "lowres, bad anatomy"
    assert info.settings["Lora hashes"] == "foo: 1a2b3c, bar: 4d5e6f"
    assert info.settings["Hires upscale"] == "Hires upscale"
    options = generation_options(info)
    assert (options["steps"], options["seed"], options["guidance_scale"]) == (20, 1234, 7.0)
    assert (options["width"], options["height"], options["model"]) == (512, 768, "v1-5-pruned-emaonly")


def test_a_text_without_a_settings_line_is_all_prompt():
    info = parse_parameters("portrait: a man, smiling\nsecond line")
    assert (info.prompt, info.negative_prompt, info.settings) == ("portrait: a man, smiling\nsecond line", None, {})
    with pytest.raises(MetadataError, match="no settings line"):
        generation_options(info)


@pytest.mark.parametrize("line, message", [
    ("Steps: 20, CFG scale: 7, Size: 8x8", "no Seed"),
    ("Steps: many, Seed: 1, Size: 8x8", "Steps must be a whole number"),
    ("Steps: 20, Seed: 1, Size: big", "Size must be WIDTHxHEIGHT"),
    ("Steps: 20, Seed: 1, CFG scale: nan", "CFG scale must be a number"),
    ("Steps: 20, Seed: 1, Batch size: 2, Batch pos: 5", "not inside a batch of 2"),
    ('Steps: 20, Seed: 1, Adapter 1: "no-scale"', "Adapter 1 must be FILE:SCALE"),
])
def test_bad_settings_are_named(line, message):
    with pytest.raises(MetadataError, match=message):
        generation_options(parse_parameters(f"a prompt\n{line}"))


def test_generation_parameters_round_trip_every_option():
    from unsee.guidance import NASA, PAG, NegativeSteer

    guidance = guidance_options([PAG(2.0, layers=("mid", "up")), NegativeSteer(start_step=1), NASA(0.25)])
    text = generation_parameters(
        prompt="a red circle", negative_prompt="blue", steps=4, guidance_scale=6.5, seed=9, width=32, height=64,
        model="toy", sampler="DDIM", guidance={**guidance, "fdg": (10.0, 5.0), "cfgpp": 0.6},
        adapters=[("dir, x/a.safetensors", -0.5, "0123456789ab"), ("b.safetensors", 1.0, None)], batch_size=3,
        batch_pos=2, dtype="float16", version="9.9")
    options = generation_options(parse_parameters(text))
    assert options["pag"] == 2.0 and options["pag_layers"] == "mid,up" and options["negative_start_step"] == 1
    assert options["negative_mode"] == "fixed" and options["nasa"] == 0.25 and "negative_start_fraction" not in options
    assert options["fdg"] == (10.0, 5.0) and options["cfgpp"] == 0.6 and options["dtype"] == "float16"
    assert options["adapters"] == [("dir, x/a.safetensors", -0.5, "0123456789ab"), ("b.safetensors", 1.0, None)]
    assert (options["batch_size"], options["batch_pos"], options["seed"]) == (3, 2, 9)
    assert (options["width"], options["height"], options["steps"], options["guidance_scale"]) == (32, 64, 4, 6.5)


def test_read_parameters_names_what_is_wrong(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(MetadataError, match="no 'parameters' text chunk"):
        read_parameters(tmp_path / "plain.png")
    with pytest.raises(MetadataError, match="is a JPEG image, not a PNG"):
        read_parameters(tmp_path / "photo.jpg")
    with pytest.raises(MetadataError, match="cannot be read as an image"):
        read_parameters(tmp_path / "text.png")
    with pytest.raises(MetadataError, match="no such file"):
        read_parameters(tmp_path / "missing.png")


# ------------------------------------------------------------------------------------------ command line


def _png_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png"))


def test_generate_writes_parameters_and_from_png_makes_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(EXAMPLE, tmp_path / "circle, erased.safetensors")  # a comma in the name: quoted in the text
    first = tmp_path / "first"
    assert main(["generate", "--model", "toy", "--prompt", "a red circle, on a gray background", "--negative",
                 "blue: square", "--steps", "2", "--num-images", "3", "--seed", "11", "--pag", "1.5",
                 "--negative-start-fraction", "0.5", "--adapter", "circle, erased.safetensors:0.75", "--out",
                 str(first), "--device", "cpu"]) == 0
    files = _png_files(first)
    assert len(files) == 3
    text = Image.open(files[1]).info["parameters"]
    assert text.splitlines()[:2] == ["a red circle, on a gray background", "Negative prompt: blue: square"]
    options = generation_options(parse_parameters(text))
    assert (options["steps"], options["seed"], options["guidance_scale"]) == (2, 12, 5.0)  # image 1: seed + 1
    assert (options["batch_size"], options["batch_pos"], options["model"], options["sampler"]) == (3, 1, "toy", "DDIM")
    assert (options["pag"], options["negative_mode"], options["negative_start_fraction"]) == (1.5, "fixed", 0.5)
    (adapter,) = options["adapters"]
    assert adapter[:2] == ("circle, erased.safetensors", 0.75) and len(adapter[2]) == 12
    assert json.loads((first / "settings.json").read_text())["images"][1]["seed"] == 12

    again = tmp_path / "again"
    assert main(["generate", "--from-png", str(files[1]), "--out", str(again), "--device", "cpu"]) == 0
    (copy,) = _png_files(again)
    assert copy.name == files[1].name and copy.read_bytes() == files[1].read_bytes()

    # a flag given wins over the image's setting; the rest still comes from the image
    other = tmp_path / "other"
    assert main(["generate", "--from-png", str(files[1]), "--steps", "3", "--out", str(other), "--device", "cpu"]) == 0
    (changed,) = _png_files(other)
    options = generation_options(parse_parameters(Image.open(changed).info["parameters"]))
    assert options["steps"] == 3 and options["seed"] == 12 and options["pag"] == 1.5
    assert options["adapters"][0][1] == 0.75
    assert changed.read_bytes() != files[1].read_bytes()


def test_from_png_with_a_seed_makes_a_batch_of_one(tmp_path):
    first = tmp_path / "first"
    assert main(["generate", "--model", "toy", "--prompt", "a blue square", "--steps", "2", "--seed", "4", "--out",
                 str(first), "--device", "cpu"]) == 0
    (original,) = _png_files(first)
    assert "Batch size" not in Image.open(original).info["parameters"]  # one image: as A1111, no batch keys
    again = tmp_path / "again"
    assert main(["generate", "--from-png", str(original), "--seed", "4", "--out", str(again), "--device", "cpu"]) == 0
    assert _png_files(again)[0].read_bytes() == original.read_bytes()


def _png_with(path: Path, text) -> Path:
    info = PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("text, message", [
    (None, "has no 'parameters' text chunk"),
    ("just some words", "has no settings line"),
    ("\x00\x01 garbage \xff: : ,,,", "has no settings line"),
    ("a red circle\nSteps: 0, Seed: 1, Size: 32x32", "its steps must be a whole number from 1 to 1000"),
    ("a red circle\nSteps: 2, Seed: 1, Size: 33x32", "its width must be a multiple of 8"),
    ("a red circle\nSteps: 2, Seed: x, Size: 32x32", "Seed must be a whole number"),
    ("a red circle\nSteps: 2, Seed: 1, Size: 32x32, Negative mode: sometimes", "negative mode must be fixed"),
    ("a red circle\nSteps: 2, Seed: 1, Size: 32x32, Adapter 1: gone.safetensors:1.0", "gone.safetensors, which is "
                                                                                       "not here"),
])
def test_from_png_refuses_a_png_without_usable_settings_in_one_line(tmp_path, capsys, text, message):
    png = _png_with(tmp_path / "image.png", text)
    assert main(["generate", "--from-png", str(png), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and f"--from-png {png}" in err, err
    assert not (tmp_path / "o").exists()


def test_from_png_refuses_a_changed_adapter(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.safetensors").write_bytes(b"not the same file")
    png = _png_with(tmp_path / "image.png", "p\nSteps: 2, Seed: 1, Size: 32x32, Adapter 1: \"a.safetensors:1.0\", "
                                             "Adapter 1 hash: 0123456789ab")
    assert main(["generate", "--from-png", str(png), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not the adapter the image was made with" in err and "--adapter" in err


def test_generate_still_needs_a_prompt_without_from_png(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "o")]) == 2
    assert "pass --prompt TEXT (or --from-png FILE" in capsys.readouterr().err


def test_demo_images_carry_parameters_that_reproduce_them(tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    import numpy as np
    from gradio.processing_utils import encode_pil_to_bytes  # how Gradio writes a gallery's PNG

    from unsee.apps.demo import DemoApp

    app = DemoApp(model="toy", workdir=tmp_path / "work")
    shutil.copy(EXAMPLE, app.adapter_dir / "esd-x-circle.safetensors")
    (before, _), (after, _) = app.generate("a red circle on a gray background", negative="blue", steps=2, seed=3,
                                           pag=1.0, negative_mode="fixed", negative_start=0.5,
                                           adapters=[("esd-x-circle.safetensors", 0.5)])
    assert "Adapter 1" not in before.info["parameters"]
    png = tmp_path / "after.png"
    png.write_bytes(encode_pil_to_bytes(after, "png"))
    options = generation_options(parse_parameters(read_parameters(png)))
    assert options["adapters"][0][:2] == ("esd-x-circle.safetensors", 0.5) and options["negative"] == "blue"
    assert (options["seed"], options["steps"], options["pag"], options["negative_start_fraction"]) == (3, 2, 1.0, 0.5)
    monkeypatch.chdir(app.adapter_dir)  # the image names the adapter by its file name in the demo's folder
    assert main(["generate", "--from-png", str(png), "--out", str(tmp_path / "again"), "--device", "cpu"]) == 0
    (again,) = _png_files(tmp_path / "again")
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(after))
    assert Image.open(again).info["parameters"] == after.info["parameters"]


def test_demo_erase_previews_are_the_generate_tabs_images_with_their_parameters(tmp_path):
    pytest.importorskip("gradio")
    import numpy as np

    from unsee.apps.demo import DemoApp
    from unsee.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    app = DemoApp(pipe=pipe, model="tiny", workdir=tmp_path)
    result = app.erase("esd-x", "circle", "paper", 1)
    file = result["file"].name
    before = [(image, caption) for image, caption in result["gallery"] if caption.startswith("before")]
    after = [(image, caption) for image, caption in result["gallery"] if caption.startswith("after")]
    assert len(before) == len(after) == 4
    for (old, caption), (new, _) in zip(before, after):
        prompt = caption.split(" · ", 1)[1]
        (plain, _), (erased, _) = app.generate(prompt, steps=25, guidance_scale=5.0, seed=0, adapters=[(file, 1.0)])
        assert np.array_equal(np.asarray(old), np.asarray(plain)) and np.array_equal(np.asarray(new), np.asarray(erased))
        assert old.info["parameters"] == plain.info["parameters"] and "Adapter 1" not in old.info["parameters"]
        assert new.info["parameters"] == erased.info["parameters"] and file in new.info["parameters"]
