"""Shared fixtures. Every test runs offline: nothing may reach a model hub."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from unsee.testing import tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402


@pytest.fixture
def tiny_sd():
    return tiny_sd_pipeline()


@pytest.fixture
def tiny_sdxl():
    return tiny_sdxl_pipeline()


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A tiny SD pipeline written with save_pretrained (shared, read-only)."""
    folder = tmp_path_factory.mktemp("tiny_sd")
    tiny_sd_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture
def accelerate_state():
    """accelerate's process-wide state, emptied for the test and put back after it."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    saved = [(cls, dict(cls._shared_state)) for cls in (AcceleratorState, PartialState, GradientState)]
    for cls, _ in saved:
        cls._shared_state.clear()
    yield
    for cls, state in saved:
        cls._shared_state.clear()
        cls._shared_state.update(state)


@pytest.fixture(scope="module")
def erased():
    """A tiny SD pipeline with a 2-step ESD-x "circle" adapter loaded (one per test module)."""
    from unsee.erasure import make_trainer

    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    adapter = make_trainer("esd-x", concept="circle", steps=2, ddim_steps=2, lr=1e-3).train(pipe)
    pipe.load_erasure(adapter, adapter_name="esd-x-circle")
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def snapshot(pipe) -> dict:
    """Every parameter and buffer of every model component, cloned."""
    out = {}
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            out.update({f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    return out


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes: equal bits, not only equal values (-0.0 vs 0.0, NaN payloads)."""
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
