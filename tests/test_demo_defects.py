"""Issue 22, items 21-23: the demo's file handling (symlinks, upload size and leftovers, long names) and its
messages (plain text, no server paths). Most checks call the app in-process; a few go through a live Gradio
server on localhost, since Gradio's own upload route and message transport are what the items are about."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import gradio as gr
import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from unsee.apps import demo as demo_module
from unsee.apps.demo import MAX_UPLOAD_BYTES, DemoApp, InputError, build_demo, launch
from unsee.testing import tiny_sd_pipeline

pytestmark = pytest.mark.app
NO_ADAPTERS = ("(none)", 1.0) * 3
GENERATE_DEFAULTS = ("", 2, 5.0, 0, 0.0, 0.0, "", "off", 0.3, 0.0, 1.0)  # negative ... nag, as the /generate API takes them
CORRUPT = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _message(error: gr.Error) -> str:
    return error.message


# -- item 21: symlinks out of the working folder ------------------------------------------------


def test_adapter_symlink_to_an_outside_file_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(CORRUPT)
    app = DemoApp(model="tiny", workdir=tmp_path / "work")
    (app.adapter_dir / "link.safetensors").symlink_to(outside / "secret.safetensors")
    (app.adapter_dir / "real.safetensors").write_bytes(CORRUPT)
    (app.adapter_dir / "alias.safetensors").symlink_to(app.adapter_dir / "real.safetensors")  # inside: allowed

    assert app.adapter_names() == ["alias.safetensors", "real.safetensors"]
    with pytest.raises(InputError, match="outside the working folder"):
        app.adapter_path("link.safetensors")
    # refused before the model is touched (there is none: model 'tiny' would fail to load)
    with pytest.raises(InputError, match="outside the working folder"):
        app.generate("a red circle", adapters=[("link.safetensors", 1.0)])
    assert app.adapter_path("alias.safetensors") == (app.adapter_dir / "real.safetensors").resolve()


def test_model_folder_symlink_to_an_outside_folder_is_refused(tmp_path):
    outside = tmp_path / "outside-model"
    outside.mkdir()
    (outside / "model_index.json").write_text("{}")
    app = DemoApp(model="tiny", workdir=tmp_path / "work")
    (app.model_dir / "link").symlink_to(outside, target_is_directory=True)
    (app.model_dir / "mine").mkdir()
    (app.model_dir / "mine-alias").symlink_to(app.model_dir / "mine", target_is_directory=True)

    with pytest.raises(InputError, match="model must be"):
        app.resolve_model("link")
    with pytest.raises(InputError, match="model must be"):
        app.load_model("link")
    assert app.resolve_model("mine") == str((app.model_dir / "mine").resolve())
    assert app.resolve_model("mine-alias") == str((app.model_dir / "mine").resolve())


def test_new_adapters_are_never_written_through_a_dangling_link(tmp_path):
    app = DemoApp(model="tiny", workdir=tmp_path / "work")
    target = tmp_path / "outside.safetensors"
    (app.adapter_dir / "esd-u-circle.safetensors").symlink_to(target)  # dangling: the file does not exist yet
    assert app._unique_adapter_path("esd-u-circle").name == "esd-u-circle-2.safetensors"

    # the toy model's example adapters are copied in when the app starts: not through a link either
    (app.adapter_dir / "example-esd-x-circle.safetensors").symlink_to(tmp_path / "example-outside.safetensors")
    DemoApp(model="toy", workdir=tmp_path / "work")  # no model is loaded until first use
    assert not (tmp_path / "example-outside.safetensors").exists()
    assert (app.adapter_dir / "example-esd-x-red.safetensors").is_file()


# -- item 23: long names, messages --------------------------------------------------------------


def test_a_5000_character_adapter_name_is_refused_by_its_length(tmp_path):
    app = DemoApp(model="tiny", workdir=tmp_path)
    name = "a" * 4988 + ".safetensors"
    with pytest.raises(InputError, match=r"adapter name is too long \(5000 characters; at most \d+\)"):
        app.adapter_path(name)
    with pytest.raises(InputError, match="too long"):
        app.generate("a red circle", adapters=[(name, 1.0)])


def test_messages_are_plain_text_and_name_files_relative_to_the_working_folder(tmp_path):
    app = DemoApp(pipe=tiny_sd_pipeline(), model="tiny", workdir=tmp_path / "work")
    (app.adapter_dir / "bad.safetensors").write_bytes(CORRUPT)
    with pytest.raises(Exception) as info:
        app.generate("a red circle", steps=1, adapters=[("bad.safetensors", 1.0)])
    assert str(app.workdir) in str(info.value)  # the raw error names the server path ...
    message = _message(demo_module._user_error(info.value, app))
    assert "adapters/bad.safetensors" in message  # ... the UI gets it relative to the working folder
    assert str(tmp_path) not in message and "&#" not in message

    message = _message(demo_module._user_error(InputError("unknown adapter 'x<b>y</b>' & co &amp;"), app))
    # plain text: no escapes, and nothing that Gradio's HTML rendering would turn into markup or a reference
    assert message == "unknown adapter 'x‹b›y‹/b›' & co ＆amp;"

    cache = gr.utils.get_upload_folder()
    crash = OSError(f"[Errno 36] File name too long: '{cache}/0123abcd/x.safetensors' and '/srv/data/y.bin'")
    message = _message(demo_module._user_error(crash, app))
    assert message == ("the job failed (OSError: [Errno 36] File name too long: 'x.safetensors' and 'y.bin'); "
                       "the app is still running")


def test_public_message_keeps_hub_ids_urls_and_fractions():
    app = DemoApp.__new__(DemoApp)
    app.workdir = Path("/nonexistent/work")
    text = "could not load 'owner/name' from https://huggingface.co/owner/name: 1/2 done, see ~/x"
    assert app.public_message(text) == text


def test_the_model_field_shows_no_server_path(tmp_path):
    app = DemoApp(pipe=tiny_sd_pipeline(), model="tiny", workdir=tmp_path / "work")
    blocks = build_demo(app)
    shown = [str(getattr(block, attr, "")) for block in blocks.blocks.values() for attr in ("info", "value", "label")]
    assert not any(str(tmp_path) in text for text in shown)
    with pytest.raises(InputError) as info:
        app.resolve_model("/etc")
    assert str(tmp_path) not in str(info.value)


# -- item 22: upload size limit, refused uploads deleted ----------------------------------------


def test_launch_gives_gradio_the_upload_limit(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: seen.update(kwargs))
    app = DemoApp(pipe=tiny_sd_pipeline(), model="tiny", workdir=tmp_path)
    launch(app, block=False)
    assert app.max_upload_bytes == MAX_UPLOAD_BYTES
    assert seen["max_file_size"] == MAX_UPLOAD_BYTES


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cache = tmp_path_factory.mktemp("gradio-cache")
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(cache)  # Gradio reads it when the Blocks and the server are made
    try:
        pipe = tiny_sd_pipeline()
        pipe.set_progress_bar_config(disable=True)
        app = DemoApp(pipe=pipe, model="tiny", workdir=tmp_path_factory.mktemp("demo"))
        app.max_upload_bytes = 64 * 1024
        demo = launch(app, port=_free_port(), block=False)
        client = Client(demo.local_url, verbose=False, download_files=False)
        yield app, demo, client, cache
        client.close()
        demo.close()
    finally:
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous


def _uploads_left(cache: Path) -> list[Path]:
    """Files with content in Gradio's temporary folder. (gr.File's preprocessing leaves one empty, unused
    NamedTemporaryFile there per event, a Gradio quirk that holds no upload data; those are not counted.)"""
    return [path for path in cache.rglob("*") if path.is_file() and path.stat().st_size > 0]


def test_an_upload_over_the_limit_is_refused_while_it_arrives_and_not_kept(served, tmp_path):
    app, demo, client, cache = served
    assert demo.max_file_size == 64 * 1024
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"\0" * (100 * 1024))
    before = app.adapter_names()
    with pytest.raises(Exception, match="exceeds the maximum file size of 65536 bytes"):  # gradio_client checks first
        client.predict(handle_file(str(big)), "(none)", "(none)", "(none)", api_name="/upload")
    # a client that does not check: the server stops reading at the limit and deletes what it had written
    response = httpx.post(demo.local_url + "gradio_api/upload", files={"files": ("big.safetensors", big.read_bytes())})
    assert response.status_code == 413 and "maximum allowed size" in response.text
    assert _uploads_left(cache) == []
    assert app.adapter_names() == before


def test_a_refused_upload_is_deleted_and_its_message_shows_no_server_path(served, tmp_path):
    app, _, client, cache = served
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(CORRUPT)
    with pytest.raises(AppError) as info:
        client.predict(handle_file(str(bad)), "(none)", "(none)", "(none)", api_name="/upload")
    message = str(info.value)
    assert "bad.safetensors" in message
    for server_path in (str(cache), str(app.workdir), str(tmp_path), "/tmp/"):
        assert server_path not in message
    assert "&#" not in message
    assert _uploads_left(cache) == [] and not list(cache.rglob("bad.safetensors"))
    assert "bad.safetensors" not in " ".join(app.adapter_names())


def test_a_long_adapter_name_through_the_ui_gets_a_length_message(served):
    _, _, client, _ = served
    with pytest.raises(AppError) as info:
        client.predict("a red circle", *GENERATE_DEFAULTS, "a" * 4988 + ".safetensors", 1.0, *NO_ADAPTERS[2:],
                       api_name="/generate")
    assert "adapter name is too long (5000 characters" in str(info.value)
    assert "job failed" not in str(info.value)


def test_ui_messages_keep_quotes_as_typed(served):
    _, _, client, _ = served
    with pytest.raises(AppError) as info:
        client.predict("a red circle", *GENERATE_DEFAULTS, "../it's.safetensors", 1.0, *NO_ADAPTERS[2:],
                       api_name="/generate")
    assert "unknown adapter" in str(info.value)
    assert "it's" in str(info.value) and "&#x27;" not in str(info.value)
