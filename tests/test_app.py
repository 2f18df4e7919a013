"""The Gradio demo, launched on a free localhost port and driven with gradio_client (tiny SD pipeline)."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from unsee.apps.demo import DemoApp, InputError, build_demo, describe, guidance_methods, launch
from unsee.guidance import NASA, PAG, CFGpp, NegativeSteer
from unsee.testing import tiny_sd_pipeline

pytestmark = pytest.mark.app
NO_ADAPTERS = ("(none)", 1.0) * 3
GENERATE_DEFAULTS = dict(negative="", steps=2, guidance_scale=5.0, seed=0, cfgpp=0.0, pag=0.0, fdg="",
                         negative_mode="off", negative_start=0.3, nasa=0.0, nag=1.0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    app = DemoApp(pipe=pipe, model="tiny", workdir=tmp_path_factory.mktemp("demo"))
    demo = launch(app, port=_free_port(), block=False)
    client = Client(demo.local_url, verbose=False)
    yield app, demo, client
    client.close()
    demo.close()


def _generate(client: Client, prompt: str, adapters=NO_ADAPTERS, **overrides):
    values = {**GENERATE_DEFAULTS, **overrides}
    return client.predict(prompt, *values.values(), *adapters, api_name="/generate")


def _image(entry: dict) -> np.ndarray:
    return np.asarray(Image.open(entry["image"]).convert("RGB"), dtype=np.int16)


def _still_serving(client: Client) -> None:
    gallery = _generate(client, "a red circle")
    assert len(gallery) == 1 and Path(gallery[0]["image"]).is_file()


def test_bound_to_localhost_only(served):
    _, demo, _ = served
    assert demo.server_name == "127.0.0.1"
    assert demo.share_url is None


def test_generate_erase_load_and_generate_with_the_adapter(served):
    app, _, client = served
    plain = _generate(client, "a red circle on a gray background")
    assert len(plain) == 1 and "seed 0" in plain[0]["caption"] and "no adapter" in plain[0]["caption"]

    file, gallery, summary, figures, *dropdowns = client.predict(
        "esd-u", "circle", "toy", 2, "(none)", "(none)", "(none)", api_name="/erase")
    saved = app.adapter_names()
    assert len(saved) == 1 and saved[0].startswith("esd-u-circle")
    assert Path(file).read_bytes() == (app.adapter_dir / saved[0]).read_bytes()
    assert len(gallery) == 8 and gallery[0]["caption"].startswith("before") and gallery[4]["caption"].startswith("after")
    assert "2 steps" in summary and "toy model" in figures  # no judge for the tiny pipeline: the figures say why
    assert saved[0] in dropdowns[0]["choices"][1] or any(saved[0] in str(c) for c in dropdowns[0]["choices"])

    both = _generate(client, "a red circle on a gray background", adapters=(saved[0], 1.0, "(none)", 1.0, "(none)", 1.0))
    assert [entry["caption"].split(" · ")[0] for entry in both] == ["without adapters", f"with {saved[0]}×1"]
    assert np.array_equal(_image(both[0]), _image(plain[0]))  # same seed, adapters off: the same image
    assert np.abs(_image(both[1]) - _image(both[0])).max() > 0  # the erasure changes the image
    assert app.pipe.active_erasures == {}  # unloaded after the call


@pytest.mark.parametrize("prompt,overrides,adapters,message", [
    ("", {}, NO_ADAPTERS, "prompt is empty"),
    ("a red circle", {"steps": 1000}, NO_ADAPTERS, "greater than maximum value 100"),  # Gradio checks slider ranges
    ("a red circle", {"guidance_scale": -3}, NO_ADAPTERS, "less than minimum value 1"),
    ("a red circle", {"fdg": "ten, five"}, NO_ADAPTERS, "FDG scales must be comma-separated numbers"),
    ("a red circle", {"nasa": 0.3}, NO_ADAPTERS, "NASA"),  # NASA without a negative prompt
    ("a red circle", {}, ("../../etc/passwd", 1.0, "(none)", 1.0, "(none)", 1.0), "unknown adapter"),
    ("a red circle", {}, ("/etc/hostname", 1.0, "(none)", 1.0, "(none)", 1.0), "unknown adapter"),
    ("a red circle", {}, ("missing.safetensors", 1.0, "(none)", 1.0, "(none)", 1.0), "no adapter named"),
])
def test_bad_generate_inputs_get_a_clear_error_and_the_app_keeps_serving(served, prompt, overrides, adapters, message):
    _, _, client = served
    with pytest.raises(AppError) as info:
        _generate(client, prompt, adapters=adapters, **overrides)
    assert message in str(info.value)  # plain text, as raised
    assert "Traceback" not in str(info.value)
    _still_serving(client)


def test_corrupt_upload_is_refused(served, tmp_path):
    app, _, client = served
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    before = app.adapter_names()
    with pytest.raises(AppError) as info:
        client.predict(handle_file(str(bad)), "(none)", "(none)", "(none)", api_name="/upload")
    assert "bad.safetensors" in str(info.value)
    assert app.adapter_names() == before  # nothing kept
    _still_serving(client)


def test_valid_upload_is_kept_and_offered(served, tmp_path):
    app, _, client = served
    pipe = tiny_sd_pipeline()
    from unsee.erasure import make_trainer

    adapter = make_trainer("esd-x", concept="square", steps=1, ddim_steps=2).train(pipe)
    path = adapter.save(tmp_path / "my square.safetensors")
    message, *dropdowns = client.predict(handle_file(str(path)), "(none)", "(none)", "(none)", api_name="/upload")
    assert "Uploaded my-square.safetensors" in message
    assert "my-square.safetensors" in app.adapter_names()


def test_paths_outside_the_working_folder_are_refused(served):
    _, _, client = served
    for model in ("/etc", "../models", "~/.cache", str(Path.cwd())):
        with pytest.raises(AppError, match="model must be"):
            client.predict(model, api_name="/load_model")
    _still_serving(client)


def test_bad_erase_inputs(served):
    _, _, client = served
    for args, message in ((("esd-q", "circle", "toy", 2), "esd-q is not in the list of choices"),
                          (("esd-u", "  ", "toy", 2), "concept is empty"),
                          (("esd-u", "circle", "huge", 2), "'huge' .* is not in the list of choices"),
                          (("esd-u", "circle", "toy", -5), "less than minimum value 0"),
                          (("esd-u", "x" * 61, "toy", 2), "concept is too long")):
        with pytest.raises(AppError, match=message):
            client.predict(*args, "(none)", "(none)", "(none)", api_name="/erase")
    _still_serving(client)


def test_ten_concurrent_generate_requests_are_all_served(served):
    _, _, client = served
    jobs = [client.submit("a blue square", *GENERATE_DEFAULTS.values(), *NO_ADAPTERS, api_name="/generate")
            for _ in range(10)]
    results = [job.result(timeout=300) for job in jobs]
    assert len(results) == 10 and all(len(r) == 1 and Path(r[0]["image"]).is_file() for r in results)
    assert len({r[0]["image"] for r in results}) == 10  # each response its own file, never rewritten under a reader
    first = _image(results[0][0])
    assert all(np.array_equal(_image(r[0]), first) for r in results)  # one at a time, same seed: same image


def test_compare_renders_every_method(served):
    _, _, client = served
    plain = client.predict("a red circle", "", 2, 5.0, 0, api_name="/compare")
    assert [e["caption"] for e in plain] == ["CFG 5", "CFG++ λ=0.6", "PAG 3", "FDG 10,5"]
    with_negative = client.predict("a red circle", "circle", 2, 5.0, 0, api_name="/compare")
    assert len(with_negative) == 8 and with_negative[-2]["caption"] == "NASA α=0.3"
    assert with_negative[-1]["caption"] == "NAG 5"
    assert with_negative[1]["caption"] == "CFG++ λ=0.6 (negative prompt)"


def test_compare_gives_the_negative_prompt_to_every_method(tmp_path):
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    app = DemoApp(pipe=pipe, model="tiny", workdir=tmp_path)
    plain = app.compare("a red circle", "", 2, 5.0, 0)
    negative = app.compare("a red circle", "blue", 2, 5.0, 0)
    for (without, label), (with_negative, caption) in zip(plain, negative[:4]):
        assert caption == label + " (negative prompt)"
        difference = np.abs(np.asarray(without, dtype=np.int16) - np.asarray(with_negative, dtype=np.int16))
        assert difference.max() > 0, f"the negative prompt changes the {label} image"


# -- without a server ---------------------------------------------------------------------------


def test_stop_ends_training_and_leaves_the_model_as_it_was(tmp_path):
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    app = DemoApp(pipe=pipe, model="tiny", workdir=tmp_path)
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    calls = []

    def press_stop(fraction, text):
        calls.append(text)
        app.stop()

    with pytest.raises(InputError, match="training stopped"):
        app.erase("esd-u", "circle", "toy", 50, progress=press_stop)
    assert len(calls) <= 2
    assert app.adapter_names() == []
    assert all(torch.equal(original[k], v) for k, v in pipe.unet.state_dict().items())


def test_guidance_controls_map_to_methods():
    methods = guidance_methods(cfgpp=0.6, pag=3.0, negative_mode="adaptive", negative_start=0.3, nasa=0.2)
    assert [type(m) for m in methods] == [CFGpp, PAG, NegativeSteer, NASA]
    assert methods[2].resolved_start == (None, None), "the adaptive mode detects its start: the slider does not apply"
    assert describe(methods[2:3], 5.0) == "negative adaptive detected per image"
    dng = guidance_methods(negative_mode="dng", negative_start=0.3)
    assert dng[0].start_fraction == 0.3 and describe(dng, 5.0) == "negative dng from 30% of the steps"
    assert guidance_methods() == []
    with pytest.raises(InputError, match="PAG scale must be between 0 and 10"):
        guidance_methods(pag=11)
    with pytest.raises(InputError, match="negative steering mode"):
        guidance_methods(negative_mode="sometimes")


def test_direct_calls_validate_like_the_ui(tmp_path):
    app = DemoApp(pipe=tiny_sd_pipeline(), model="tiny", workdir=tmp_path)
    with pytest.raises(InputError, match="steps must be between 1 and 100"):
        app.generate("a red circle", steps=1000)
    with pytest.raises(InputError, match="method must be one of"):
        app.erase("esd-q", "circle")
    with pytest.raises(InputError, match="unknown adapter"):
        app.adapter_path("../weights.safetensors")


def test_app_builds_three_tabs(tmp_path):
    demo = build_demo(DemoApp(pipe=tiny_sd_pipeline(), model="tiny", workdir=tmp_path))
    labels = [block.label for block in demo.blocks.values() if type(block).__name__ == "Tab"]
    assert labels == ["Generate", "Erase", "Compare guidance"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (scripts/setup.sh installs it)")
def test_headless_chromium_shows_the_three_tabs(served, tmp_path):
    _, demo, _ = served
    command = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,900", "--virtual-time-budget=20000"]
    dom = subprocess.run([*command, "--dump-dom", demo.local_url], capture_output=True, text=True, timeout=120).stdout
    for tab in ("Generate", "Erase", "Compare guidance"):
        assert tab in dom
    shot = tmp_path / "demo.png"
    subprocess.run([*command, f"--screenshot={shot}", demo.local_url], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (900, 1280) and pixels.std() > 5  # a rendered page, not a blank one
