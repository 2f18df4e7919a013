"""unsee's Gradio demo: erase a concept, then generate with and without the erasure, side by side.

    unsee demo                                    # the toy model, on http://127.0.0.1:7860
    unsee demo --model PATH_OR_HUB_ID --port 7861 --workdir demo-work   # or: python -m unsee.apps ...

Three tabs:

- **Erase**: method, concept, preset or step count; live progress and a Stop button. The adapter is saved
  in the app's working folder and offered for download, with a before/after gallery and, on the toy model,
  the efficacy figures (the judge's concept presence and accuracy on other prompts, before and after).
- **Generate**: prompt, negative prompt, every guidance method, and up to three adapters (trained here or
  uploaded) with a scale each; the same seed rendered without and with the adapters, side by side.
- **Compare guidance**: one prompt and seed under each guidance method, in a grid.

Safety: the app binds to 127.0.0.1 unless told otherwise and makes no public link unless ``share=True``.
Model work runs one job at a time (a queue with concurrency 1); the Stop button runs beside it. Every input
is validated and a bad one is answered with a message, never a traceback; a failing job leaves the pipeline
as it was (adapters unloaded, trained weights restored) and the app serving. The UI names adapters by file
name only: they live in ``<workdir>/adapters``. A model is ``toy``, a hub id (from the local cache when
offline) or the name of a folder in ``<workdir>/models``; no other server path is reachable from the UI:
names are checked for length before anything touches the file system, and symlinks are followed to their
real paths and refused when those lie outside the working folder.

Uploads: Gradio refuses a file over ``max_upload_bytes`` while it arrives (``max_file_size``), and the
upload handler deletes every upload from Gradio's temporary folder once it is handled (a kept adapter is
copied into ``<workdir>/adapters`` first). Messages are plain text (no HTML escapes) and name files
relative to the working folder; they never show a server path.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no version-check thread on an offline machine

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from unsee.adapters import AdapterError, load_adapter  # noqa: E402
from unsee.erasure import METHODS, ConfigError, TrainingError, make_trainer  # noqa: E402
from unsee import __version__  # noqa: E402
from unsee.files import atomic_write, slug  # noqa: E402
from unsee.guidance import (FDG, NAG, NASA, PAG, CFGpp, GuidanceError, NegativeSteer, registry,  # noqa: E402
                            validate_combination)
from unsee.jobs import grid_prompts  # noqa: E402
from unsee.loading import ModelLoadError, load_pipeline  # noqa: E402
from unsee.model_card import card_path, write_model_card  # noqa: E402
from unsee.png_metadata import (PARAMETERS_KEY, file_hash, generation_parameters, guidance_options,  # noqa: E402
                                sampler_name)
from unsee.toy import world  # noqa: E402
from unsee.toy.presets import PRESETS, WORLD_PROMPT_KEYS, is_toy_pipeline, preset_settings  # noqa: E402

__all__ = ["DemoApp", "InputError", "build_demo", "launch", "run"]

logger = logging.getLogger("unsee.demo")

ADAPTER_SLOTS = 3
MAX_PROMPT_CHARS = 300
MAX_UPLOAD_BYTES = 512 * 1024 * 1024
MAX_NAME_CHARS = 120  # adapter file names, checked before any file-system call (the OS limit is 255 bytes)
MAX_SEED = 2**31 - 1
NEGATIVE_MODES = ("off",) + registry.NEGATIVE_MODES
CONTROLS = registry.controls()  # the guidance widgets, in the order the generate API takes them
_ADAPTER_FILE = re.compile(r"[A-Za-z0-9][\w.+-]*\.safetensors")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")
# errors whose message is meant for the user: shown as they are
_USER_ERRORS = (AdapterError, ConfigError, GuidanceError, ModelLoadError, TrainingError)


class InputError(ValueError):
    """A bad value from the UI; the message names the field and what it accepts."""


class StopRequested(Exception):
    """Raised inside a training run's progress callback when the Stop button was pressed."""


# ----------------------------------------------------------------------------------------------
# Input checks (every value from the UI goes through one of these)
# ----------------------------------------------------------------------------------------------


def check_text(value: Any, field: str, required: bool = True, max_chars: int = MAX_PROMPT_CHARS) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InputError(f"{field} must be text, got {type(value).__name__}")
    value = value.strip()
    if required and not value:
        raise InputError(f"{field} is empty: type something, e.g. 'a red circle on a gray background'")
    if len(value) > max_chars:
        raise InputError(f"{field} is too long ({len(value)} characters; at most {max_chars})")
    return value


def check_number(value: Any, field: str, low: float, high: float, integer: bool = False) -> Any:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InputError(f"{field} must be a number between {low:g} and {high:g}, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise InputError(f"{field} must be a number between {low:g} and {high:g}, got {value!r}")
    if not low <= value <= high:
        raise InputError(f"{field} must be between {low:g} and {high:g}, got {value:g}")
    if integer:
        if float(value) != int(value):
            raise InputError(f"{field} must be a whole number, got {value:g}")
        return int(value)
    return float(value)


def parse_scales(text: Any, low: float = 1.0, high: float = 30.0) -> Optional[tuple[float, ...]]:
    """FDG's per-band scales from "10, 5" (None for an empty field)."""
    text = check_text(text, "FDG scales", required=False, max_chars=60)
    if not text:
        return None
    try:
        scales = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"FDG scales must be comma-separated numbers from high to low frequency, e.g. '10, 5'; "
                         f"got {text!r}") from None
    if not 2 <= len(scales) <= 6:
        raise InputError(f"FDG needs 2 to 6 scales (one per band), got {len(scales)}")
    for scale in scales:
        check_number(scale, "each FDG scale", low, high)
    return scales


def _checked(control: registry.Control, value: Any) -> Any:
    """A guidance control's value, checked against the control's range or choices."""
    if control.widget == "slider":
        return check_number(value, control.what, control.low, control.high)
    if control.widget == "dropdown":
        if value not in control.choices:
            raise InputError(f"{control.what} must be one of {', '.join(control.choices)}, got {value!r}")
        return value
    return parse_scales(value, control.low, control.high)  # the text control: FDG's comma-separated scales


def guidance_methods(cfgpp: Any = 0.0, pag: Any = 0.0, fdg: Any = "", negative_mode: str = "off",
                     negative_start: Any = 0.3, nasa: Any = 0.0, nag: Any = 1.0) -> list:
    """The guidance objects the Generate tab's controls ask for (a control at its "off" value leaves its method out);
    the controls are ``unsee.guidance.registry``'s."""
    given = dict(cfgpp=cfgpp, pag=pag, fdg=fdg, negative_mode=negative_mode, negative_start=negative_start, nasa=nasa,
                 nag=nag)
    return registry.methods_from_controls({c.name: _checked(c, given[c.name]) for c in CONTROLS})


def describe(methods: Sequence[Any], guidance_scale: float) -> str:
    if not methods:
        return f"CFG {guidance_scale:g}"
    return " + ".join(m.describe() for m in methods)


# ----------------------------------------------------------------------------------------------
# The app's state and actions (plain Python: the Gradio layer below only wires them to widgets)
# ----------------------------------------------------------------------------------------------


class DemoApp:
    """The demo's model, working folder and actions.

    Args:
        pipe: a pipeline to serve (unsee's SD or SDXL subclass); None loads ``model`` on first use.
        model: the model's name as the UI shows it (``"toy"``, a hub id, or a folder in ``<workdir>/models``).
        workdir: where adapters are saved and uploads are kept (a new temporary folder when None).
        judge: callable(images) -> judged attributes, for the efficacy figures; None uses the toy judge on
            the toy model and shows no figures on other models.
        eval_images: images per figure (more is slower and steadier).
        max_steps: the largest inference step count the UI accepts.
        max_upload_bytes: the largest adapter upload (Gradio refuses bigger files while they arrive).
    """

    def __init__(self, pipe: Any = None, model: str = "toy", workdir: Optional[os.PathLike] = None,
                 judge: Optional[Callable] = None, eval_images: int = 16, max_steps: int = 100,
                 max_upload_bytes: int = MAX_UPLOAD_BYTES) -> None:
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="unsee-demo-"))
        self.adapter_dir = self.workdir / "adapters"
        self.model_dir = self.workdir / "models"
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        self.model_dir.mkdir(parents=True, exist_ok=True)
        self.max_upload_bytes = int(max_upload_bytes)
        self.pipe = pipe
        self.model = model
        self.judge = judge
        self.eval_images = eval_images
        self.max_steps = max_steps
        self._stop = threading.Event()
        self._model_lock = threading.Lock()  # the queue runs one model job at a time; this guards direct calls
        if model == "toy":
            self._add_example_adapters()

    # -- model -----------------------------------------------------------------------------------

    def pipeline(self) -> Any:
        if self.pipe is None:
            self.pipe = self._load(self.model)
        return self.pipe

    def resolve_model(self, text: Any) -> str:
        """What ``load_pipeline`` gets for a model field value; refuses anything that is a server path."""
        text = check_text(text, "model", max_chars=200)
        if text == "toy":
            return text
        if _FOLDER_NAME.fullmatch(text) and ".." not in text:
            folder = self._inside(self.model_dir / text, self.model_dir)
            if folder is not None and folder.is_dir():
                return str(folder)
        if _HUB_ID.fullmatch(text) and ".." not in text and not os.path.lexists(text):
            return text
        raise InputError(f"model must be 'toy', a hub id such as 'owner/name', or the name of a folder in the "
                         f"working folder's models/ (symlinks to places outside the working folder are refused); "
                         f"got {text!r}")

    @staticmethod
    def _inside(path: Path, folder: Path) -> Optional[Path]:
        """``path`` with every symlink resolved, or None when that real path is not inside ``folder``'s real path."""
        try:
            real = path.resolve()
            root = folder.resolve()
        except (OSError, RuntimeError):  # a symlink loop, a name the OS refuses
            return None
        return real if real != root and real.is_relative_to(root) else None

    def _load(self, model: str) -> Any:
        pipe = load_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        if not hasattr(pipe, "load_erasure"):
            raise InputError(f"{model!r} is not a Stable Diffusion or SDXL pipeline; the demo needs one")
        return pipe

    def load_model(self, text: Any) -> str:
        target = self.resolve_model(text)
        with self._model_lock:
            pipe = self._load(target)
            self.pipe, self.model = pipe, text.strip()
            if self.model == "toy":
                self._add_example_adapters()
        return f"Loaded {self.model} ({type(pipe).__name__})."

    def _judge(self) -> Optional[Callable]:
        if self.judge is not None:
            return self.judge
        if self.model == "toy":
            from unsee.toy.judge import default_judge

            try:
                self.judge = default_judge()
            except OSError:  # no judge weights
                return None
            return self.judge
        return None

    # -- adapters ----------------------------------------------------------------------------------

    def _add_example_adapters(self) -> None:
        """Put the toy model's shipped example adapters (weights/examples) in the adapter list."""
        from unsee.toy import EXAMPLE_ADAPTERS_DIR

        for source in sorted(EXAMPLE_ADAPTERS_DIR.glob("*.safetensors")):
            target = self.adapter_dir / f"example-{source.name}"
            if _ADAPTER_FILE.fullmatch(target.name) and not os.path.lexists(target):  # never through a link
                shutil.copyfile(source, target)

    def _real_adapter(self, name: str) -> Optional[Path]:
        """The real path of ``adapters/<name>`` when it is a file inside the adapters folder (symlinks followed)."""
        real = self._inside(self.adapter_dir / name, self.adapter_dir)
        try:
            return real if real is not None and real.is_file() else None
        except OSError:
            return None

    def adapter_names(self) -> list[str]:
        return sorted(p.name for p in self.adapter_dir.glob("*.safetensors")
                      if len(p.name) <= MAX_NAME_CHARS and _ADAPTER_FILE.fullmatch(p.name)
                      and self._real_adapter(p.name))

    def adapter_path(self, name: Any) -> Path:
        """The real path of an adapter the UI names: a plain file name in the adapters folder whose real path
        (symlinks followed) lies inside that folder."""
        if not isinstance(name, str):
            raise InputError(f"an adapter name must be text, got {type(name).__name__}")
        if len(name) > MAX_NAME_CHARS:
            raise InputError(f"adapter name is too long ({len(name)} characters; at most {MAX_NAME_CHARS}): "
                             "pick one from the list")
        if not _ADAPTER_FILE.fullmatch(name) or ".." in name:
            raise InputError(f"unknown adapter {name!r}: pick one from the list (the adapters in the app's working "
                             "folder), or upload a .safetensors file")
        path = self._real_adapter(name)
        if path is None:
            if os.path.islink(self.adapter_dir / name):
                raise InputError(f"adapter {name!r} is a link to a file outside the working folder; the app only "
                                 "reads adapters inside it (copy the file into adapters/ or upload it)")
            raise InputError(f"no adapter named {name!r} in the working folder; pick one from the list")
        return path

    def _unique_adapter_path(self, stem: str) -> Path:
        stem = slug(stem)
        path = self.adapter_dir / f"{stem}.safetensors"
        index = 2
        while os.path.lexists(path):  # a dangling symlink counts: writing through it would land outside
            path = self.adapter_dir / f"{stem}-{index}.safetensors"
            index += 1
        return path

    def upload(self, file: Any) -> tuple[str, str]:
        """Validate an uploaded adapter, check it fits the model, and keep it in the working folder.

        Returns (the stored name, a message)."""
        if file is None:
            raise InputError("choose a .safetensors adapter file to upload")
        source = Path(getattr(file, "name", file))
        if source.suffix != ".safetensors":
            raise InputError(f"adapters are .safetensors files; {source.name!r} is not")
        if not source.is_file():  # e.g. the same file uploaded twice at once: the first upload's handler deleted it
            raise InputError(f"{source.name} is no longer on the server; upload it again")
        if source.stat().st_size > self.max_upload_bytes:
            raise InputError(f"{source.name} is larger than {self.max_upload_bytes / 2**20:g} MiB")
        pipe = self.pipeline()
        adapter = load_adapter(source, pipe=pipe)  # AdapterError with the reason, checked against the model first
        with self._model_lock:
            name = pipe.load_erasure(adapter, adapter_name="unsee-demo-upload-check")
            pipe.unload_erasure(name)
        target = self._unique_adapter_path(source.stem)
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))  # in a fresh temporary folder, then renamed
        return target.name, f"Uploaded {target.name}: {adapter.method} erasing {', '.join(adapter.concepts)}."

    # -- generate ----------------------------------------------------------------------------------

    def _render(self, prompt: str, negative: str, steps: int, guidance_scale: float, seed: int,
                methods: list, adapters: Sequence[tuple[str, float, Optional[str]]] = ()) -> Any:
        """One image, its settings in its ``parameters`` text (``unsee generate --from-png`` makes it again);
        ``adapters``: (file name, scale, hash) of the adapters loaded."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        image = self.pipe(prompt, negative_prompt=negative or None, num_inference_steps=steps,
                          guidance_scale=guidance_scale, generator=generator, guidance=methods).images[0]
        image.info[PARAMETERS_KEY] = generation_parameters(
            prompt=prompt, negative_prompt=negative or None, steps=steps, guidance_scale=guidance_scale, seed=seed,
            width=image.size[0], height=image.size[1], model=self.model, sampler=sampler_name(self.pipe.scheduler),
            guidance=guidance_options(methods), adapters=adapters, version=__version__)
        return image

    def generate(self, prompt: Any, negative: Any = "", steps: Any = 25, guidance_scale: Any = 5.0, seed: Any = 0,
                 cfgpp: Any = 0.0, pag: Any = 0.0, fdg: Any = "", negative_mode: str = "off",
                 negative_start: Any = 0.3, nasa: Any = 0.0, nag: Any = 1.0,
                 adapters: Sequence[tuple[Any, Any]] = ()) -> list[tuple[Any, str]]:
        """The prompt without and with the chosen adapters (same seed); [(image, caption), ...]."""
        prompt = check_text(prompt, "prompt")
        negative = check_text(negative, "negative prompt", required=False)
        steps = check_number(steps, "steps", 1, self.max_steps, integer=True)
        guidance_scale = check_number(guidance_scale, "guidance scale", 1.0, 20.0)
        seed = check_number(seed, "seed", 0, MAX_SEED, integer=True)
        methods = guidance_methods(cfgpp, pag, fdg, negative_mode, negative_start, nasa, nag)
        validate_combination(methods, has_negative_prompt=bool(negative), guidance_scale=guidance_scale)
        chosen = []
        for index, (name, scale) in enumerate(adapters, start=1):
            if name in (None, "", "(none)"):
                continue
            chosen.append((name, self.adapter_path(name), check_number(scale, f"adapter {index} scale", -2.0, 2.0)))
        settings = f"seed {seed}, {steps} steps, {describe(methods, guidance_scale)}"
        with self._model_lock:
            self.pipeline()
            before = self._render(prompt, negative, steps, guidance_scale, seed, methods)
            if not chosen:
                return [(before, f"no adapter · {settings}")]
            loaded = []
            try:
                for index, (_, path, scale) in enumerate(chosen):
                    loaded.append(self.pipe.load_erasure(path, scale=scale, adapter_name=f"unsee-demo-{index}"))
                named = [(name, scale, file_hash(path)) for name, path, scale in chosen]
                after = self._render(prompt, negative, steps, guidance_scale, seed, methods, named)
            finally:
                for name in loaded:
                    self.pipe.unload_erasure(name)
        with_text = ", ".join(f"{name}×{scale:g}" for name, _, scale in chosen)
        return [(before, f"without adapters · {settings}"), (after, f"with {with_text} · {settings}")]

    # -- compare guidance --------------------------------------------------------------------------

    def compare(self, prompt: Any, negative: Any = "", steps: Any = 25, guidance_scale: Any = 5.0,
                seed: Any = 0) -> list[tuple[Any, str]]:
        """One prompt and seed under each guidance method; the negative-prompt methods need a negative prompt."""
        prompt = check_text(prompt, "prompt")
        negative = check_text(negative, "negative prompt", required=False)
        steps = check_number(steps, "steps", 1, self.max_steps, integer=True)
        guidance_scale = check_number(guidance_scale, "guidance scale", 1.0, 20.0)
        seed = check_number(seed, "seed", 0, MAX_SEED, integer=True)
        rows: list[list] = [[], [CFGpp(0.6)], [PAG(3.0)], [FDG((2 * guidance_scale, guidance_scale))]]
        if negative:
            rows += [[NegativeSteer(start_fraction=0.3)], [NegativeSteer(mode="adaptive")], [NASA(0.3)], [NAG()]]
        gallery = []
        with self._model_lock:
            self.pipeline()
            for methods in rows:
                # a negative prompt fills the unconditional branch from the first step, as in diffusers, unless
                # a method sets the unconditional branch (NegativeSteer) or takes it into attention (NASA, NAG): README,
                # composition table
                validate_combination(methods, has_negative_prompt=bool(negative), guidance_scale=guidance_scale)
                image = self._render(prompt, negative, steps, guidance_scale, seed, methods)
                plain_negative = negative and not any(m.contract.needs_negative for m in methods)
                label = describe(methods, guidance_scale) + (" (negative prompt)" if plain_negative else "")
                gallery.append((image, label))
        return gallery

    # -- erase -------------------------------------------------------------------------------------

    def stop(self) -> str:
        self._stop.set()
        return "Stopping: training ends at its next step; the model is left as it was."

    def erase(self, method: Any, concept: Any, preset: Any = "toy", steps: Any = 0,
              progress: Optional[Callable[[float, str], None]] = None) -> dict:
        """Train an erasure adapter on the current model; returns its file, a before/after gallery and figures.

        ``steps`` 0 takes the preset's step count. ``progress(fraction, text)`` is called as training goes.
        """
        if method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        concept = check_text(concept, "concept", max_chars=60)
        if preset not in PRESETS:
            raise InputError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        steps = check_number(steps, "steps", 0, 5000, integer=True)
        own = {"steps": steps} if steps else {}
        settings = preset_settings(preset, method, model=self.model, concept=concept, settings=own)
        trainer = make_trainer(method, concept=concept, **settings)  # ConfigError before any work
        world_prompts = bool(set(preset_settings(preset, method, model=self.model, concept=concept))
                             & set(WORLD_PROMPT_KEYS))
        self._stop.clear()
        report = progress or (lambda fraction, text: None)

        def on_progress(event: Any) -> None:
            if self._stop.is_set():
                raise StopRequested()
            fraction = event.step / max(1, event.total)
            loss = f", loss {event.loss:.4f}" if event.loss is not None else ""
            report(fraction, f"{event.phase} {event.step}/{event.total}{loss}")

        with self._model_lock:
            pipe = self.pipeline()
            if world_prompts and not is_toy_pipeline(pipe):  # as the job runner does (unsee.jobs)
                raise InputError(f"the toy preset gives {method} the toy world's prompts, and the model loaded is not "
                                 "the embedded toy model; choose the paper preset")
            started = time.perf_counter()
            try:
                adapter = trainer.train(pipe, progress=on_progress)
            except StopRequested:
                raise InputError("training stopped; nothing was saved and the model is as it was") from None
            seconds = time.perf_counter() - started
            path = self._unique_adapter_path(f"{method}-{concept}")
            adapter.save(path)
            report(1.0, "before/after images")
            prompts = grid_prompts(concept, 4, seed=0, toy=is_toy_pipeline(pipe))
            # one image per prompt and seed 0, each with its settings in its text (as the Generate tab's)
            before = [self._render(p, "", 25, 5.0, 0, []) for p in prompts]
            name = pipe.load_erasure(adapter, adapter_name="unsee-demo-preview")
            try:
                named = [(path.name, 1.0, file_hash(path))]
                after = [self._render(p, "", 25, 5.0, 0, [], named) for p in prompts]
            finally:
                pipe.unload_erasure(name)
            figures = self._figures(adapter, concept, report)
            card = card_path(path)  # its model card, <name>.README.md; a file already there is never replaced
            if not os.path.lexists(card):
                write_model_card(adapter, card, file_name=path.name, base_model=self.model,
                                 figures={k.replace("_", " "): v for k, v in (figures or {}).items()})
        gallery = [(image, f"before · {p}") for image, p in zip(before, prompts)]
        gallery += [(image, f"after · {p}") for image, p in zip(after, prompts)]
        summary = (f"Trained {method} on {concept!r} in {seconds:.0f} s ({adapter.training.get('steps')} steps); "
                   f"saved {path.name} ({path.stat().st_size / 1024:.0f} KiB).")
        return {"file": path, "gallery": gallery, "summary": summary, "figures": figures}

    # -- messages ----------------------------------------------------------------------------------

    def public_message(self, text: str) -> str:
        """``text`` as the UI may show it: files in the working folder named relative to it (``adapters/x``), files
        in Gradio's temporary folder and any other absolute path by their file name only, and plain text that
        renders as itself (Gradio shows messages as sanitized HTML: no markup, no character references)."""
        for root in sorted({os.path.abspath(self.workdir), str(self.workdir.resolve())}, key=len, reverse=True):
            text = text.replace(root + os.sep, "")
            text = re.sub(re.escape(root) + r"(?=$|[\s'\",;:)])", "the working folder", text)
        for cache in {gr.utils.get_upload_folder(), str(Path(gr.utils.get_upload_folder()).resolve())}:
            text = re.sub(re.escape(cache.rstrip(os.sep)) + r"/(?:[^/\s'\"]+/)?", "", text)
        text = _ABSOLUTE_PATH.sub(lambda match: match.group(1) or "a server folder", text)
        return _plain_text(text)

    def _figures(self, adapter: Any, concept: str, report: Callable[[float, str], None]) -> Optional[dict]:
        """Presence of the concept and accuracy on other prompts, without and with ``adapter`` (toy world only)."""
        judge = self._judge()
        try:
            world.concept_attribute(concept)
        except ValueError:
            return None
        if judge is None:
            return None
        from unsee.toy.evaluation import evaluate_erasure

        report(1.0, "efficacy figures (before)")
        named_before, others_before = evaluate_erasure(self.pipe, concept, n=self.eval_images, judge=judge)
        name = self.pipe.load_erasure(adapter, adapter_name="unsee-demo-erase")
        try:
            report(1.0, "efficacy figures (after)")
            named_after, others_after = evaluate_erasure(self.pipe, concept, n=self.eval_images, judge=judge)
        finally:
            self.pipe.unload_erasure(name)

        def mean_accuracy(result: Any) -> float:
            return sum(result.accuracy.values()) / max(1, len(result.accuracy))

        return {"images": self.eval_images,
                "presence_before": named_before.presence, "presence_after": named_after.presence,
                "accuracy_other_before": mean_accuracy(others_before),
                "accuracy_other_after": mean_accuracy(others_after)}


# ----------------------------------------------------------------------------------------------
# The Gradio layer
# ----------------------------------------------------------------------------------------------


# an absolute path (at the start, or after a space, a quote, a bracket or '='; not inside a word, a URL or a
# relative path): group 1 is its last component
_ABSOLUTE_PATH = re.compile(r"(?<![^\s'\"(\[=])/(?:[^\s'\"/]+/)*([^\s'\"/]*)")
# characters that would make a message markup (or a character reference) when Gradio renders it as HTML
_MARKUP = str.maketrans({"<": "‹", ">": "›"})
_REFERENCE = re.compile(r"&(?=#?\w+;)")


def _plain_text(text: str) -> str:
    """``text`` with nothing the UI's HTML rendering would turn into markup or a character reference."""
    return _REFERENCE.sub("＆", text.translate(_MARKUP))


def _user_error(error: BaseException, app: DemoApp) -> gr.Error:
    """A plain-text message for the UI, with no server path; unexpected errors are logged in full on the server
    and shown by name and message only."""
    if isinstance(error, (InputError, *_USER_ERRORS)):
        return gr.Error(app.public_message(str(error)), print_exception=False)
    logger.exception("demo job failed")
    return gr.Error(app.public_message(f"the job failed ({type(error).__name__}: {error}); the app is still running"),
                    print_exception=False)


def _discard_upload(file: Any, cache: Path) -> None:
    """Delete an upload from Gradio's temporary folder ``cache`` (and its now empty per-upload folder); files
    anywhere else are left alone."""
    if file is None:
        return
    path = Path(getattr(file, "name", file))
    try:
        root = cache.resolve()
        if path.is_symlink() or not path.resolve().is_relative_to(root) or path.resolve() == root:
            return
        path.unlink(missing_ok=True)
        parent = path.resolve().parent
        if parent != root and parent.is_relative_to(root) and not any(parent.iterdir()):
            parent.rmdir()
    except OSError:
        logger.warning("could not delete an upload from Gradio's temporary folder", exc_info=True)


def _figures_markdown(figures: Optional[dict]) -> str:
    if figures is None:
        return "Efficacy figures need the toy model and a concept of its world (a shape, colour, background or style)."
    pct = (lambda value: f"{100 * value:.0f}%")
    return (f"| judged on {figures['images']} images each | before | after |\n|---|---|---|\n"
            f"| concept present on prompts that name it | {pct(figures['presence_before'])} | "
            f"{pct(figures['presence_after'])} |\n"
            f"| accuracy on prompts that do not | {pct(figures['accuracy_other_before'])} | "
            f"{pct(figures['accuracy_other_after'])} |")


def _own_files(gallery: list[tuple[Any, str]]) -> list[tuple[Any, str]]:
    """The gallery with each image a copy tagged with a response id in its PNG text. Gradio caches an output image
    under the hash of its bytes and rewrites that file for every response that returns the same image, so a client
    still downloading it could read it half-written (seen with ten identical requests at once); distinct bytes give
    each response its own file."""
    tagged = []
    for image, caption in gallery:
        image = image.copy()
        image.info["unsee-response"] = uuid.uuid4().hex
        tagged.append((image, caption))
    return tagged


def build_demo(app: DemoApp) -> gr.Blocks:
    """The Blocks app for ``app``; its API endpoints are /generate, /compare, /erase, /upload, /load_model."""

    def adapter_choices() -> list[str]:
        return ["(none)", *app.adapter_names()]

    def refreshed(*selected: Any) -> list:
        choices = adapter_choices()
        return [gr.update(choices=choices, value=value if value in choices else "(none)") for value in selected]

    def generate(prompt, negative, steps, guidance_scale, seed, *rest):
        # rest: the guidance controls (registry order), then (adapter, scale) per slot
        try:
            controls, slots = rest[:len(CONTROLS)], rest[len(CONTROLS):]
            pairs = list(zip(slots[0::2], slots[1::2]))
            guidance = {control.name: value for control, value in zip(CONTROLS, controls)}
            return _own_files(app.generate(prompt, negative, steps, guidance_scale, seed, **guidance, adapters=pairs))
        except Exception as error:  # noqa: BLE001 - every failure becomes a message; the app keeps serving
            raise _user_error(error, app) from None

    def compare(prompt, negative, steps, guidance_scale, seed):
        try:
            return _own_files(app.compare(prompt, negative, steps, guidance_scale, seed))
        except Exception as error:  # noqa: BLE001
            raise _user_error(error, app) from None

    def erase(method, concept, preset, steps, *selected, progress=gr.Progress()):
        try:
            result = app.erase(method, concept, preset, steps,
                               progress=lambda fraction, text: progress(fraction, desc=text))
        except Exception as error:  # noqa: BLE001
            raise _user_error(error, app) from None
        return [str(result["file"]), _own_files(result["gallery"]), result["summary"],
                _figures_markdown(result["figures"]), *refreshed(*selected)]

    def upload(file, *selected):
        try:
            _, message = app.upload(file)  # a kept adapter is copied into the working folder
        except Exception as error:  # noqa: BLE001
            raise _user_error(error, app) from None
        finally:
            _discard_upload(file, Path(demo.GRADIO_CACHE))  # refused or copied: Gradio's copy is not needed
        return [message, *refreshed(*selected)]

    def load_model(text):
        try:
            return app.load_model(text)
        except Exception as error:  # noqa: BLE001
            raise _user_error(error, app) from None

    def guidance_widget(control: registry.Control):
        """The Gradio widget of a guidance control of ``unsee.guidance.registry``."""
        if control.widget == "slider":
            return gr.Slider(control.low, control.high, value=control.default, step=control.step, label=control.label)
        if control.widget == "dropdown":
            return gr.Dropdown(list(control.choices), value=control.default, label=control.label)
        return gr.Textbox(label=control.label, placeholder=control.placeholder)

    def prompt_controls(negative_label: str) -> tuple:
        """Prompt, negative prompt, steps, guidance scale and seed widgets (Generate and Compare share them)."""
        prompt = gr.Textbox(label="Prompt", value="a red circle on a gray background")
        negative = gr.Textbox(label=negative_label, value="")
        with gr.Row():
            steps = gr.Slider(1, app.max_steps, value=25, step=1, label="Steps")
            guidance_scale = gr.Slider(1.0, 20.0, value=5.0, step=0.5, label="Guidance scale (CFG)")
            seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
        return prompt, negative, steps, guidance_scale, seed

    with gr.Blocks(title="unsee: erase and generate") as demo:
        gr.Markdown("# unsee\nErase a concept from a text-to-image model, then generate with and without the "
                    "erasure. Model work runs one job at a time.")
        with gr.Row():
            model_box = gr.Textbox(value=app.model, label="Model",
                                   info="'toy', a hub id (owner/name), or a folder in the working folder's models/")
            model_button = gr.Button("Load model", scale=0)
            model_status = gr.Markdown()
        model_button.click(load_model, [model_box], [model_status], api_name="load_model")

        slot_dropdowns: list[gr.Dropdown] = []
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    prompt, negative, steps, guidance_scale, seed = prompt_controls("Negative prompt")
                    with gr.Accordion("Guidance methods (0, 1 for NAG, or empty: off)", open=False):
                        guidance_inputs = [guidance_widget(control) for control in CONTROLS]
                    with gr.Accordion("Adapters", open=True):
                        slot_inputs = []
                        for index in range(1, ADAPTER_SLOTS + 1):
                            with gr.Row():
                                # custom values allowed: the list is refreshed per page, the app checks every name
                                dropdown = gr.Dropdown(adapter_choices(), value="(none)", label=f"Adapter {index}",
                                                       allow_custom_value=True)
                                scale = gr.Slider(-2.0, 2.0, value=1.0, step=0.1, label="Scale")
                            slot_dropdowns.append(dropdown)
                            slot_inputs += [dropdown, scale]
                        upload_file = gr.File(label="Upload an adapter (.safetensors)", file_types=[".safetensors"],
                                              type="filepath")
                        upload_status = gr.Markdown()
                    generate_button = gr.Button("Generate", variant="primary")
                with gr.Column():
                    generate_gallery = gr.Gallery(label="Without / with adapters (same seed)", columns=2,
                                                  format="png")
            generate_button.click(
                generate, [prompt, negative, steps, guidance_scale, seed, *guidance_inputs, *slot_inputs],
                [generate_gallery], api_name="generate")
            upload_file.upload(upload, [upload_file, *slot_dropdowns], [upload_status, *slot_dropdowns],
                               api_name="upload")

        with gr.Tab("Erase"):
            with gr.Row():
                with gr.Column():
                    method = gr.Dropdown(list(METHODS), value="esd-u", label="Method")
                    concept = gr.Textbox(value="circle", label="Concept to erase")
                    preset = gr.Radio(list(PRESETS), value="toy" if app.model == "toy" else "paper", label="Preset")
                    erase_steps = gr.Number(value=0, precision=0, minimum=0, maximum=5000,
                                            label="Steps (0: the preset's)")
                    with gr.Row():
                        erase_button = gr.Button("Erase", variant="primary")
                        stop_button = gr.Button("Stop", variant="stop")
                    erase_summary = gr.Markdown()
                    adapter_file = gr.File(label="Adapter (download)", interactive=False)
                with gr.Column():
                    erase_gallery = gr.Gallery(label="Before (top) / after (bottom)", columns=4, format="png")
                    erase_figures = gr.Markdown()
            erase_event = erase_button.click(
                erase, [method, concept, preset, erase_steps, *slot_dropdowns],
                [adapter_file, erase_gallery, erase_summary, erase_figures, *slot_dropdowns], api_name="erase")
            stop_button.click(app.stop, None, [erase_summary], cancels=[erase_event], concurrency_limit=None,
                              api_name="stop")

        with gr.Tab("Compare guidance"):
            with gr.Row():
                with gr.Column():
                    compare_inputs = prompt_controls("Negative prompt (adds the negative-prompt methods)")
                    compare_button = gr.Button("Compare", variant="primary")
                with gr.Column():
                    compare_gallery = gr.Gallery(label="Guidance methods", columns=4, format="png")
            compare_button.click(compare, list(compare_inputs), [compare_gallery], api_name="compare")
        demo.load(refreshed, slot_dropdowns, slot_dropdowns, api_visibility="private")  # adapters saved since
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo


def launch(app: DemoApp, host: str = "127.0.0.1", port: Optional[int] = None, share: bool = False,
           block: bool = True) -> gr.Blocks:
    """Build and launch the demo; with ``block=False`` it returns at once (the server runs in a thread)."""
    demo = build_demo(app)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                allowed_paths=[str(app.adapter_dir)], show_error=True, footer_links=["gradio"],
                max_file_size=app.max_upload_bytes)
    return demo


def run(args: argparse.Namespace) -> int:
    """Serve the demo with the options of ``unsee demo`` (``unsee.cli.add_demo_arguments``) until interrupted."""
    app = DemoApp(model=args.model, workdir=args.workdir)
    app.pipe = app._load(args.model)  # the launch option may be any path; the UI's model field may not
    launch(app, host=args.host, port=args.port, share=args.share)
    return 0

