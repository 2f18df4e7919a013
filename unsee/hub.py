"""Upload an erasure adapter to the Hugging Face Hub: its ``.safetensors`` file and a model card as ``README.md``.

:func:`push_adapter` (``Adapter.push_to_hub``) writes both into a temporary folder, creates the repository if needed
(``HfApi.create_repo(exist_ok=True)``) and uploads the folder in one commit (``HfApi.upload_folder``). The token is
huggingface_hub's usual one (``hf auth login``, ``HF_TOKEN``) unless ``token`` is given.

Like :mod:`unsee.model_card`, this module takes the adapter object as it is given (it needs ``save``, ``method``
and ``concepts``), so the adapter format can offer it as a method without importing it at load time.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

__all__ = ["push_adapter", "HubError"]

_REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.\-]{0,95}/)?[A-Za-z0-9][\w.\-]{0,95}")


class HubError(ValueError):
    """A push that cannot be made as asked (a bad repository id or file name); nothing is uploaded."""


def push_adapter(
    adapter: Any, repo_id: str, *, file_name: Optional[str] = None, card: Optional[str] = None,
    base_model: Optional[str] = None, license: Optional[str] = None, figures: Optional[Mapping[str, Any]] = None,
    extra_files: Sequence[Union[str, os.PathLike]] = (), private: Optional[bool] = None,
    token: Optional[str] = None, commit_message: Optional[str] = None, revision: Optional[str] = None,
    create_pr: bool = False,
) -> Any:
    """Upload ``adapter`` to the model repository ``repo_id`` (created when missing) with its model card.

    Args:
        file_name: the adapter's name in the repository (default ``<method>-<concept>.safetensors``).
        card: the ``README.md`` text (e.g. the ``<name>.README.md`` that ``unsee erase`` wrote); default: made by
            :func:`unsee.model_card.model_card` with ``base_model``, ``license`` and ``figures``.
        extra_files: more files to upload beside them, by their names (e.g. the ``.grid.png`` preview).
        private, token, revision, create_pr: as in ``huggingface_hub.HfApi``.

    Returns what ``HfApi.upload_folder`` returns (a ``CommitInfo``, whose ``commit_url`` names the commit).
    """
    from huggingface_hub import HfApi

    from .files import slug
    from .model_card import model_card

    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or ".." in repo_id:
        raise HubError(f"{str(repo_id)[:100]!r} is not a Hub repository id; give 'owner/name' (or 'name' for your own)")
    if file_name is None:
        concept = adapter.concepts[0] if adapter.concepts else "concept"
        file_name = f"{slug(adapter.method, fallback='adapter')}-{slug(concept)}.safetensors"
    if Path(file_name).name != file_name or not file_name.endswith(".safetensors") or file_name == "README.md":
        raise HubError(f"file_name must be a plain file name ending in .safetensors, got {file_name!r}")
    extras = [Path(p).expanduser() for p in extra_files]
    for path in extras:
        if not path.is_file():
            raise HubError(f"extra file {path} does not exist; give files that exist")
        if path.name in (file_name, "README.md"):
            raise HubError(f"extra file {path.name} would replace the adapter or its card; rename it")
    if card is None:
        card = model_card(adapter, file_name=file_name, base_model=base_model, license=license, figures=figures,
                          repo_id=repo_id)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="unsee-push-") as folder:
        adapter.save(Path(folder) / file_name)  # validated before anything leaves the machine
        (Path(folder) / "README.md").write_text(card, encoding="utf-8")
        for path in extras:
            (Path(folder) / path.name).write_bytes(path.read_bytes())
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload unsee {adapter.method} adapter {file_name}",
        )
