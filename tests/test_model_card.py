"""Model cards (README.md) for adapters, written by ``unsee erase``, and ``Adapter.push_to_hub`` (upload mocked)."""

import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard

from unsee.adapters import Adapter, AdapterError, load_adapter
from unsee.model_card import card_path, hub_model_id, model_card, write_model_card

EXAMPLE = Path(__file__).resolve().parents[1] / "weights" / "examples" / "esd-x-circle.safetensors"


def _lora() -> Adapter:
    g = torch.Generator().manual_seed(0)
    return Adapter(kind="lora", method="spm", concepts=["Van Gogh", "red"], rank=2, alpha=1.0,
                   tensors={"unet.mid.to_k.lora_A.weight": torch.randn(2, 8, generator=g),
                            "unet.mid.to_k.lora_B.weight": torch.randn(8, 2, generator=g)},
                   training={"steps": 7, "loss_first": 0.5, "loss_last": 0.25, "seconds": 1.5})


def test_card_front_matter_and_body_of_a_lora():
    text = model_card(_lora(), file_name="spm-van-gogh.safetensors", base_model="runwayml/stable-diffusion-v1-5",
                      license="creativeml-openrail-m", figures={"presence after": 0.125}, repo_id="me/no-van-gogh")
    card = ModelCard(text)
    data = card.data.to_dict()
    assert data["base_model"] == "runwayml/stable-diffusion-v1-5" and data["library_name"] == "diffusers"
    assert data["license"] == "creativeml-openrail-m" and data["concepts"] == ["Van Gogh", "red"]
    assert {"unsee", "concept-erasure", "spm", "lora"} <= set(data["tags"])
    body = card.text
    assert '"Van Gogh", "red"' in body and "rank 2, alpha 1.0" in body
    assert 'pipe.load_erasure(hf_hub_download("me/no-van-gogh", "spm-van-gogh.safetensors"))' in body
    assert 'pipe.load_lora_weights("me/no-van-gogh", weight_name="spm-van-gogh.safetensors")' in body
    assert "unsee export spm-van-gogh.safetensors --format kohya --out spm-van-gogh-kohya.safetensors" in body
    assert "<lora:spm-van-gogh-kohya:1>" in body
    assert "| training steps | 7 |" in body and "| last loss | 0.25 |" in body and "| presence after | 0.125 |" in body


def test_card_of_a_delta_on_a_local_model():
    adapter = load_adapter(EXAMPLE)
    text = model_card(adapter, file_name="esd-x-circle.safetensors", base_model="/models/my-sd")
    data = ModelCard(text).data.to_dict()
    assert "base_model" not in data  # a local path is no Hub id
    assert data["license"] == "other" and "set it to that licence" in text
    assert "load_lora_weights" not in text and "--format kohya --rank 16" in text and "truncated SVD" in text
    assert 'pipe.load_erasure("esd-x-circle.safetensors")' in text  # the card lies beside the file
    toy = ModelCard(model_card(adapter, file_name="a.safetensors", base_model="toy")).data.to_dict()
    assert toy["license"] == "apache-2.0" and "base_model" not in toy


def test_names_and_no_clobbering(tmp_path):
    assert card_path(tmp_path / "esd-x-circle.safetensors") == tmp_path / "esd-x-circle.README.md"
    assert hub_model_id("stabilityai/sdxl-turbo") == "stabilityai/sdxl-turbo"
    assert hub_model_id("toy") is None and hub_model_id("../a/b") is None
    target = tmp_path / "x.README.md"
    target.write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_model_card(_lora(), target)
    assert target.read_text() == "mine"
    write_model_card(_lora(), target, overwrite=True)
    assert ModelCard.load(target).data.to_dict()["tags"][:2] == ["unsee", "concept-erasure"]
    assert "x.safetensors" in target.read_text()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """HfApi.create_repo and upload_folder replaced: the 'upload' copies the folder into a local remote."""
    remote = tmp_path / "remote"
    calls = {"create": [], "upload": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create"].append((repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload"].append((repo_id, kwargs))
        shutil.copytree(folder_path, remote / repo_id, dirs_exist_ok=True)
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return remote, calls


def test_push_to_hub_uploads_the_adapter_and_its_card(fake_hub, tmp_path):
    remote, calls = fake_hub
    adapter = load_adapter(EXAMPLE)
    (tmp_path / "grid.png").write_bytes(b"png")
    assert adapter.push_to_hub("me/esd-circle", base_model="CompVis/stable-diffusion-v1-4", private=True,
                               figures={"presence after": 0.0}, extra_files=[tmp_path / "grid.png"]) == "commit"
    assert calls["create"] == [("me/esd-circle", {"private": True, "repo_type": "model", "exist_ok": True})]
    (repo_id, options), = calls["upload"]
    assert repo_id == "me/esd-circle" and "esd-x" in options["commit_message"]
    folder = remote / "me" / "esd-circle"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "esd-x-circle.safetensors", "grid.png"]
    pushed = load_adapter(folder / "esd-x-circle.safetensors")
    assert pushed.method == "esd-x" and pushed.concepts == ["circle"]
    assert all(torch.equal(pushed.tensors[k], v) for k, v in adapter.tensors.items())
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "CompVis/stable-diffusion-v1-4" and card.data.concepts == ["circle"]
    assert {"unsee", "concept-erasure", "esd-x"} <= set(card.data.tags)
    assert 'hf_hub_download("me/esd-circle", "esd-x-circle.safetensors")' in card.text


def test_push_to_hub_takes_a_written_card_and_refuses_bad_names_before_uploading(fake_hub):
    remote, calls = fake_hub
    adapter = _lora()
    adapter.fingerprint = {"unet": "0" * 16}
    with pytest.raises(AdapterError, match="not a Hub repository id"):
        adapter.push_to_hub("a/b/c")
    with pytest.raises(AdapterError, match="plain file name ending in .safetensors"):
        adapter.push_to_hub("me/x", file_name="../up.safetensors")
    assert calls == {"create": [], "upload": []}


def test_erase_writes_the_card_beside_the_adapter(tiny_sd_folder, tmp_path):
    from unsee.jobs import run_jobs

    out = tmp_path / "adapters" / "circle.safetensors"
    report = run_jobs({"method": "esd-x", "concept": "circle", "model": str(tiny_sd_folder), "steps": 1,
                       "ddim_steps": 2, "grid": 0, "out": str(out), "device": "cpu"})
    card = ModelCard.load(out.with_name("circle.README.md"))
    assert report["jobs"][0]["card"] == str(out.with_name("circle.README.md"))
    assert card.data.concepts == ["circle"] and "esd-x" in card.data.tags and card.data.license == "other"
    assert 'pipe.load_erasure("circle.safetensors")' in card.text and "| training steps | 1 |" in card.text


def test_the_demo_writes_a_card_beside_the_adapter_it_saves(tmp_path):
    pytest.importorskip("gradio")
    from unsee.apps.demo import DemoApp
    from unsee.testing import tiny_sd_pipeline

    app = DemoApp(pipe=tiny_sd_pipeline(), model="tiny", workdir=tmp_path / "work")
    (app.adapter_dir / "esd-x-circle.safetensors").write_bytes(b"an older adapter")
    (app.adapter_dir / "esd-x-circle.README.md").write_text("the user's notes")
    saved = app.erase("esd-x", "circle", "paper", 1)["file"]
    assert saved.name == "esd-x-circle-2.safetensors"
    card = ModelCard.load(card_path(saved))
    assert card.data.concepts == ["circle"] and 'pipe.load_erasure("esd-x-circle-2.safetensors")' in card.text
    assert (app.adapter_dir / "esd-x-circle.README.md").read_text() == "the user's notes"
