"""Model cards for erasure adapters: the ``README.md`` a Hugging Face Hub repository shows.

:func:`model_card` builds the text from an adapter's own description (method, concepts, kind, training summary):
YAML front matter (``base_model``, ``library_name: diffusers``, ``license``, ``tags``: unsee, concept-erasure, the
method; ``concepts``) and a body that says what the adapter erases, how to load it with unsee and plain diffusers,
in ComfyUI and AUTOMATIC1111/Forge (after ``unsee export --format kohya``), and the figures measured when erasing.

``unsee erase`` writes the card beside each adapter as ``<name>.README.md`` (several adapters can share a folder;
each keeps its own card), and :meth:`unsee.Adapter.push_to_hub` uploads it as the repository's ``README.md``.

This module reads nothing but the adapter object it is given (duck-typed: ``kind``, ``method``, ``concepts``,
``is_lora``, ``rank``, ``alpha``, ``components``, ``tensors``, ``training``), so the adapter format can use it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

__all__ = ["model_card", "write_model_card", "card_path", "hub_model_id"]

TOY_LICENSE = "apache-2.0"  # the embedded toy model is unsee's own, under unsee's licence
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}")


def card_path(adapter_path: Union[str, os.PathLike]) -> Path:
    """Where ``unsee erase`` writes an adapter's card: ``<folder>/<name>.README.md`` beside ``<name>.safetensors``."""
    path = Path(adapter_path)
    return path.with_name(f"{path.stem}.README.md")


def hub_model_id(model: Optional[str]) -> Optional[str]:
    """``model`` when it names a Hub repository (``owner/name``, not a local path), else None."""
    if not model or not _HUB_ID.fullmatch(model) or Path(model).expanduser().exists():
        return None
    return model


def _py(value: str) -> str:
    """A Python string literal of ``value`` (for the code in the card)."""
    return json.dumps(value, ensure_ascii=False)


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def model_card(adapter: Any, *, file_name: str, base_model: Optional[str] = None, license: Optional[str] = None,
               figures: Optional[Mapping[str, Any]] = None, repo_id: Optional[str] = None) -> str:
    """The model card (``README.md`` text) of ``adapter`` stored as ``file_name``.

    Args:
        base_model: the model it was trained on ("toy", a hub id, a local path); a hub id goes into the front matter.
        license: the ``license`` field; default: the toy model's licence for "toy", else ``other`` (an adapter of a
            model is usually bound by that model's licence: set it to that).
        figures: measured figures to list (name -> value), e.g. the presence of the concept before and after.
        repo_id: the Hub repository the card is for (the loading examples name it; default: a local path).
    """
    from huggingface_hub import ModelCard, ModelCardData

    concepts = [str(c) for c in adapter.concepts]
    named = ", ".join(f'"{c}"' for c in concepts) or "(no concept recorded)"
    hub_base = hub_model_id(base_model)
    if license is None:
        license = TOY_LICENSE if base_model == "toy" else "other"
    tags = ["unsee", "concept-erasure", adapter.method, "text-to-image", "diffusers"]
    if adapter.is_lora:
        tags.append("lora")
    data = ModelCardData(base_model=hub_base, library_name="diffusers", license=license, tags=tags,
                         concepts=concepts, unsee_method=adapter.method, unsee_kind=adapter.kind)
    licence_note = license == "other"
    where = repo_id or file_name  # a local card lies beside its adapter
    model_text = ("unsee's embedded toy model" if base_model == "toy" else base_model) or "the model it was trained on"
    load_base = base_model if base_model else "BASE_MODEL"
    if adapter.is_lora:
        rank = adapter.rank if adapter.rank is not None else "?"
        shape = f"a LoRA (rank {rank}, alpha {adapter.alpha if adapter.alpha is not None else rank})"
    else:
        shape = f"weight deltas ({len(adapter.tensors)} tensors)"
    lines = [
        f"# {adapter.method} erasure of {named}",
        "",
        f"An [unsee](https://github.com/unsee-project/unsee) concept-erasure adapter: with it loaded, {model_text} "
        f"no longer draws {named}; other prompts are meant to stay as they were. It was trained with "
        f"**{adapter.method}** and holds {shape} on {', '.join(adapter.components) or 'no component'} "
        f"(`{file_name}`, kind `{adapter.kind}`).",
        "",
        "## Use with diffusers (unsee)",
        "",
        "```python",
        "import unsee",
        "",
        f"pipe = unsee.load_pipeline({_py(load_base)})",
    ]
    if repo_id:
        lines += ["from huggingface_hub import hf_hub_download",
                  f"pipe.load_erasure(hf_hub_download({_py(repo_id)}, {_py(file_name)}))  # scale=0.5: half strength"]
    else:
        lines += [f"pipe.load_erasure({_py(where)})  # scale=0.5: half strength"]
    lines += [f"image = pipe({_py('a photo of ' + (concepts[0] if concepts else '...'))}).images[0]",
              "pipe.unload_erasure()  # the original weights, bit for bit", "```", ""]
    if adapter.is_lora:
        source = f"{_py(repo_id)}, weight_name={_py(file_name)}" if repo_id else _py(where)
        lines += ["The file is also a plain diffusers LoRA:", "", "```python",
                  "from diffusers import AutoPipelineForText2Image", "",
                  f"pipe = AutoPipelineForText2Image.from_pretrained({_py(load_base)})",
                  f"pipe.load_lora_weights({source})", "```", ""]
    kohya = f"{Path(file_name).stem}-kohya.safetensors"
    rank = "" if adapter.is_lora else " --rank 16"
    lines += [
        "## ComfyUI, AUTOMATIC1111 and Forge",
        "",
        "Convert it to a kohya LoRA (`pip install unsee`):",
        "",
        "```bash",
        f"unsee export {file_name} --format kohya{rank} --out {kohya}",
        "```",
        "",
    ]
    if not adapter.is_lora:
        lines += ["This adapter holds full weight deltas: `--rank R` fits a LoRA by truncated SVD and prints its "
                  "relative error (a higher rank is closer to the adapter).", ""]
    lines += [f"Put `{kohya}` into ComfyUI's `models/loras` (a LoraLoader node) or A1111/Forge's `models/Lora` "
              f"(`<lora:{Path(kohya).stem}:1>` in the prompt).", ""]
    training = dict(getattr(adapter, "training", {}) or {})
    measured = []
    for key, label in (("steps", "training steps"), ("loss_first", "first loss"), ("loss_last", "last loss"),
                       ("seconds", "training time (s)")):
        if training.get(key) is not None:
            measured.append((label, training[key]))
    measured += [(str(k), v) for k, v in (figures or {}).items() if v is not None]
    if measured:
        lines += ["## Measured", "", "| | |", "|---|---|"]
        lines += [f"| {label} | {_figure(value)} |" for label, value in measured]
        lines.append("")
    if licence_note:
        lines += ["The licence field says `other`: an adapter of a model is usually bound by that model's licence; "
                  "set it to that licence before you share the adapter.", ""]
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    ModelCard(text)  # the front matter must read back (raises otherwise)
    return text


def write_model_card(adapter: Any, path: Union[str, os.PathLike], *, file_name: Optional[str] = None,
                     overwrite: bool = False, **options: Any) -> Path:
    """Write :func:`model_card` atomically to ``path``; an existing file is replaced only with ``overwrite``."""
    from .files import atomic_write

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    text = model_card(adapter, file_name=file_name or path.name.replace(".README.md", ".safetensors"), **options)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
