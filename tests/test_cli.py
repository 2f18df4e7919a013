import json
import subprocess
import sys

import pytest
from PIL import Image

from unsee import __version__
from unsee.cli import main


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "unsee.cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"unsee {__version__}"
    helptext = subprocess.run([sys.executable, "-m", "unsee.cli", "--help"], capture_output=True, text=True, check=True)
    assert "generate" in helptext.stdout


def test_generate_writes_pngs_and_settings(tiny_sd_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["generate", "--model", str(tiny_sd_folder), "--prompt", "a red circle", "--prompt", "a blue star",
                 "--num-images", "2", "--steps", "2", "--seed", "5", "--out", str(out), "--device", "cpu"])
    assert code == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["prompts"] == ["a red circle", "a blue star"] and settings["seed"] == 5
    assert settings["steps"] == 2 and settings["guidance_scale"] == 5.0
    assert len(settings["images"]) == 4
    for entry in settings["images"]:
        image = Image.open(out / entry["file"])
        assert image.size == (32, 32)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_generate_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    assert "no file or folder" in capsys.readouterr().err
    assert main(["generate", "--prompt", "  ", "--out", str(tmp_path / "o")]) == 2
    assert "must not be empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_generate_with_guidance_flags(tiny_sd_folder, tmp_path):
    out = tmp_path / "guided"
    code = main(["generate", "--model", str(tiny_sd_folder), "--prompt", "a red circle", "--negative", "circle",
                 "--cfgpp", "0.6", "--pag", "3", "--negative-start-fraction", "0.3", "--nasa", "0.2", "--steps", "3",
                 "--out", str(out), "--device", "cpu"])
    assert code == 0
    settings = json.loads((out / "settings.json").read_text())
    assert [g["method"] for g in settings["guidance"]] == ["CFGpp", "PAG", "NegativeSteer", "NASA"]
    assert settings["guidance"][2]["start_fraction"] == 0.3 and settings["guidance"][2]["start_step"] is None


def test_generate_rejects_bad_guidance_before_loading(tmp_path, capsys):
    assert main(["generate", "--prompt", "x", "--nasa", "0.3", "--out", str(tmp_path / "o")]) == 2
    assert "need a negative prompt" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--cfgpp", "0.6", "--fdg", "10,5", "--out", str(tmp_path / "o")]) == 2
    assert "use one of them" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--negative", "y", "--negative-mode", "adaptive", "--negative-start-fraction", "0.3",
                 "--out", str(tmp_path / "o")]) == 2
    assert "leave start_fraction and start_step unset" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, message", [
    (["--negative-start", "1"], "ambiguous ('1'): use --negative-start-fraction 0.3 (a fraction of the steps) or "
                                "--negative-start-step 5"),
    (["--negative-start", "1.0"], "ambiguous"),
    (["--negative-start-fraction", "0.3", "--negative-start-step", "2"], "not allowed with"),
    (["--negative-start-fraction", "1.5"], "must be a finite number from 0 to 1"),
    (["--negative-start-step", "0.5"], "expected a whole number"),
])
def test_negative_start_is_a_fraction_or_a_step_by_name(tmp_path, capsys, flags, message):
    assert main(["generate", "--prompt", "x", "--negative", "y", *flags, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_negative_start_step_reaches_the_pipeline(tiny_sd_folder, tmp_path):
    out = tmp_path / "step"
    assert main(["generate", "--model", str(tiny_sd_folder), "--prompt", "a red circle", "--negative", "circle",
                 "--negative-start-step", "1", "--steps", "2", "--out", str(out), "--device", "cpu"]) == 0
    steer = json.loads((out / "settings.json").read_text())["guidance"][0]
    assert (steer["method"], steer["start_step"], steer["start_fraction"]) == ("NegativeSteer", 1, None)


def test_demo_command_binds_to_localhost_by_default(capsys):
    from unsee.cli import build_parser

    args = build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.share, args.model) == ("127.0.0.1", 7860, False, "toy")
    try:
        main(["demo", "--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert "--share" in capsys.readouterr().out


def test_erase_help_lists_the_registered_methods(capsys):
    from unsee.erasure import METHODS

    try:
        main(["erase", "--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, at hyphens too
    for name, method in METHODS.items():
        assert "".join(f"{name} ({method.summary})".split()) in text


def test_file_names_from_prompts_and_concepts():
    from unsee.files import slug

    assert slug("A red circle, on GRAY!") == "a-red-circle-on-gray"
    assert slug("Van Gogh") == "van-gogh" and slug("***") == "concept" and slug("***", fallback="prompt") == "prompt"
    assert len(slug("x" * 100)) == 40
