"""The ``unsee`` command line.

    unsee generate --prompt "a red circle on a gray background" --out out/
    unsee erase --method esd-u --concept circle --steps 200 --out esd-u-circle.safetensors
    unsee erase --config jobs.yaml
    unsee erase --method esd-x --concepts concepts.txt --out esd-x-many.safetensors   # one adapter, many concepts
    unsee fuse esd-x-circle.safetensors esd-x-star.safetensors --out esd-x-circle-star.safetensors
    torchrun --nproc_per_node 2 -m unsee.cli erase --method esd-u --concept circle   # data parallel, 2 processes
    torchrun --nproc_per_node 2 -m unsee.cli eval --suite prompts.csv --judge nudenet --model ...   # rows shared by 2
    unsee eval --suite unsee/toy/suites/circle.csv --judge toy --adapter esd-u-circle.safetensors --out eval-circle/
    unsee attack --adapter esd-u-circle.safetensors --concept circle
    unsee export esd-u-circle.safetensors --format kohya --rank 8 --out esd-u-circle-kohya.safetensors
    unsee export esd-u-circle.safetensors --format checkpoint --model toy --out toy-without-circles.safetensors
    unsee demo
    unsee --version

Bad input exits with status 2 and one line naming the problem and the fix, before any model is loaded or any
file written. Numbers are checked against the limits below (also shown in ``unsee COMMAND --help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import __version__

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
          "bf16": "bfloat16"}

# Limits of the command line (inclusive). They keep a typo from asking for days of work or more memory than any
# machine has; the Python API takes what the pipelines and trainers take.
MAX_STEPS = 1000  # denoising steps (the schedulers' 1000 training timesteps)
MAX_SIDE = 4096  # --width/--height, multiples of 8
MAX_IMAGES = 64  # --num-images per prompt
MAX_PIXELS = 16 * 2**20  # --num-images x width x height in one pipeline call (64 of 512x512, 16 of 1024x1024)
MAX_GUIDANCE = 100.0  # --guidance-scale (the guidance methods' limits: unsee.guidance.registry)
MAX_ADAPTER_SCALE = 100.0  # FILE:SCALE, in size
MAX_SEED = 2**32 - 1
MAX_EVAL_IMAGES = 10_000  # eval --n
MAX_EVAL_BYTES = 8 * 2**30  # eval keeps one prompt set's images in memory (RGB, 3 bytes a pixel)
MAX_EVAL_BATCH = 64  # eval --suite --batch-size
MAX_ATTACK_PROMPTS = 1000  # attack --n
MAX_PREFIX_TOKENS = 16  # attack --prefix-tokens (the prompt must still fit in the text encoder's 77 tokens)
MAX_ATTACK_STEPS = 1000  # attack --attack-steps
MAX_TRAIN_STEPS = 100_000  # erase --steps (the other training settings: each config's, unsee.erasure.fields.setting_limits)
MAX_RANK = 1024  # erase --rank
MAX_GRID = 16  # erase --grid
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# generate's defaults, filled in after --from-png (whose image's settings come before them)
_GENERATE_DEFAULTS = {"steps": 25, "guidance_scale": 5.0, "num_images": 1, "seed": 0, "model": "toy",
                      "pag_layers": "mid"}


class UsageError(Exception):
    """Bad command-line input; printed without a traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block): ``unsee CMD: error: PROBLEM; FIX``.

    An option's help may be given as ``lazy_help`` (a function) on its action: it is called when the help is shown,
    so that texts read from the erasure registry (which imports torch) cost nothing to other commands."""

    def format_help(self) -> str:
        for action in self._actions:
            fill = getattr(action, "lazy_help", None)
            if fill is not None:
                action.help = fill()
        return super().format_help()

    def error(self, message: str) -> None:  # type: ignore[override]
        if re.search(r"(arguments are required|unrecognized arguments|expected (one|at least one) argument|"
                     r"ambiguous option|not allowed with|invalid \S+ value)", message):
            message += f" (see '{self.prog} --help')"
        self.exit(2, f"{self.prog}: error: {message}\n")


def _show(text: str, limit: int = 40) -> str:
    """A user's text as a message shows it: quoted, and cut when long."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``."""

    def convert(text: str) -> int:
        try:
            value = int(text.strip()) if len(text) <= 40 else None
        except ValueError:
            value = None
        if value is None:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {_show(text)}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}, got {_show(text)}")
        return value

    return convert


def _float_in(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number from ``low`` to ``high``."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number from {low:g} to {high:g}, got {_show(text)}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be a finite number from {low:g} to {high:g}, got {_show(text)}")
        return value

    return convert


def _side(text: str) -> int:
    """An image side: a multiple of 8 (the VAE's factor) from 8 to MAX_SIDE."""
    try:
        value = int(text.strip()) if len(text) <= 40 else None
    except ValueError:
        value = None
    if value is None or not 8 <= value <= MAX_SIDE or value % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 from 8 to {MAX_SIDE}, got {_show(text)}")
    return value


_seed = _int_in(0, MAX_SEED)


def _adapter_spec(text: str) -> tuple[str, float]:
    """FILE or FILE:SCALE."""
    path, _, scale = text.rpartition(":")
    try:
        value = float(scale) if path else None
    except ValueError:
        value = None
    if value is None:  # no scale (a colon in the file's name, or none at all)
        path, scale, value = text, "1", 1.0
    if not (math.isfinite(value) and abs(value) <= MAX_ADAPTER_SCALE):
        raise argparse.ArgumentTypeError(f"the adapter scale must be a number from {-MAX_ADAPTER_SCALE:g} to "
                                         f"{MAX_ADAPTER_SCALE:g}, got {_show(scale)}")
    if not path.strip():
        raise argparse.ArgumentTypeError(f"adapter must be FILE or FILE:SCALE, got {_show(text)}")
    return path, value


def _device(text: str) -> str:
    from .loading import device_problem

    problem = device_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _model(text: str) -> str:
    """A model argument: a local single-file checkpoint must look like one (its first bytes)."""
    from .files import model_file_problem

    path = Path(text).expanduser()
    if text != "toy" and path.suffix in SINGLE_FILE_SUFFIXES and path.is_file():
        problem = model_file_problem(path)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{problem}; pass a Stable Diffusion checkpoint, a diffusers folder, "
                                             "a hub id or 'toy'")
    return text


def _folder_arg(text: str) -> str:
    """A folder that is created if missing: an existing file there is refused."""
    path = Path(text).expanduser()
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder, got an empty path")
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{_show(text)} is a file; give a folder (it is created if missing)")
    return text


def _existing_folder(text: str) -> str:
    if not Path(text).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"{_show(text)} is not a folder; give a local diffusers folder")
    return text


def _check_output(path: str, flag: str, folder: bool = False, create_parents: bool = True) -> None:
    """Refuse, before any work, an output that cannot be written."""
    from .files import output_problem

    problem = output_problem(path, folder=folder, create_parents=create_parents)
    if problem is not None:
        fix = "create it first or choose another path" if "does not exist" in problem else "choose another path"
        raise UsageError(f"{flag} {path}: {problem}; {fix}")


def _check_adapters(adapters: Sequence[tuple[str, float]]) -> None:
    for path, _ in adapters:
        if not Path(path).expanduser().is_file():
            raise UsageError(f"--adapter {path}: no such file; give an adapter .safetensors file")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="toy", type=_model,
                        help="'toy' (embedded default), a hub id, a local diffusers folder or a single-file checkpoint")
    parser.add_argument("--config", default=None, type=_existing_folder,
                        help="for a single-file model: a local diffusers folder to take configs from")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights precision (default: as stored)")
    parser.add_argument("--device", default=None, type=_device,
                        help="cpu, cuda, cuda:1, mps... (default: cuda if available, else cpu); must exist here")


def _floats_in(count: int, low: float, high: float) -> Callable[[str], tuple[float, ...]]:
    """An argparse type: 1 to ``count`` comma-separated finite numbers, each from ``low`` to ``high``."""

    def convert(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 10,5, got {_show(text)}") from None
        if not 1 <= len(values) <= count or not all(math.isfinite(v) and low <= v <= high for v in values):
            raise argparse.ArgumentTypeError(f"expected 1 to {count} comma-separated finite scales from {low:g} to "
                                             f"{high:g}, such as 10,5, got {_show(text)}")
        return values

    return convert



def _ambiguous_start(text: str):
    """The old --negative-start: '1' meant step 1 and '1.0' meant never; refused with the two flags that replace it."""
    raise argparse.ArgumentTypeError(f"is ambiguous ({_show(text)}): use --negative-start-fraction 0.3 (a fraction of "
                                     f"the steps) or --negative-start-step 5 (a step index)")


def _option_type(option) -> Callable[[str], Any]:
    """The argparse type of a guidance option of ``unsee.guidance.registry`` (its range checked)."""
    if option.kind == "float":
        return _float_in(option.low, option.high)
    if option.kind == "int":
        return _int_in(int(option.low), int(option.high))
    if option.kind == "floats":
        return _floats_in(option.count, option.low, option.high)
    return str


def _add_guidance_options(parser: argparse.ArgumentParser) -> None:
    """The guidance flags, one per option of each method in ``unsee.guidance.registry``."""
    from .guidance import registry

    group = parser.add_argument_group("guidance (combine freely; see unsee.guidance)")
    exclusive: dict[str, Any] = {}
    for option in registry.options():
        target = group
        if option.exclusive is not None:
            if option.exclusive not in exclusive:
                exclusive[option.exclusive] = group.add_mutually_exclusive_group()
            target = exclusive[option.exclusive]
        extra = {"choices": option.choices, "default": None} if option.choices else {"type": _option_type(option)}
        if option.default is not None:
            extra["default"] = option.default
        target.add_argument(option.flag, metavar=option.metavar, help=option.help, **extra)
    # the old --negative-start ('1' meant step 1 and '1.0' meant never), refused with the two flags that replace it
    exclusive["negative_start"].add_argument("--negative-start", type=_ambiguous_start, metavar="START",
                                             help=argparse.SUPPRESS)


def guidance_from_args(args: argparse.Namespace) -> list:
    """The guidance objects the CLI flags ask for."""
    from .guidance import registry

    return registry.methods_from_options({o.dest: getattr(args, o.dest, None) for o in registry.options()})


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="unsee", description="Concept erasure and guidance for diffusers text-to-image pipelines."
    )
    parser.add_argument("--version", action="version", version=f"unsee {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate images from prompts",
                         description=f"Generate images; writes PNGs and settings.json. Limits: --steps 1 to {MAX_STEPS}, "
                                     f"--num-images 1 to {MAX_IMAGES}, --width/--height multiples of 8 from 8 to "
                                     f"{MAX_SIDE} with --num-images x width x height at most {MAX_PIXELS:,} pixels, "
                                     f"--guidance-scale 0 to {MAX_GUIDANCE:g}, --seed 0 to {MAX_SEED}.")
    gen.add_argument("--prompt", action="append", default=None,
                     help="text prompt (repeat for several); required unless --from-png gives it")
    gen.add_argument("--from-png", default=None, metavar="FILE",
                     help="take every setting from the 'parameters' text of a PNG that unsee generate, the demo or "
                          "AUTOMATIC1111 wrote, to make that image again; the flags given here override its settings")
    gen.add_argument("--negative", default=None, help="negative prompt")
    gen.add_argument("--out", required=True, type=_folder_arg, help="output folder (created if missing)")
    gen.add_argument("--steps", type=_int_in(1, MAX_STEPS), default=25, help=f"denoising steps, 1 to {MAX_STEPS} (default 25)")
    gen.add_argument("--guidance-scale", type=_float_in(0.0, MAX_GUIDANCE), default=5.0,
                     help=f"classifier-free guidance scale, 0 to {MAX_GUIDANCE:g} (default 5)")
    gen.add_argument("--num-images", type=_int_in(1, MAX_IMAGES), default=1, help=f"images per prompt, 1 to {MAX_IMAGES}")
    gen.add_argument("--seed", type=_seed, default=0, help=f"0 to {MAX_SEED} (default 0)")
    gen.add_argument("--height", type=_side, default=None,
                     help=f"image height, a multiple of 8 up to {MAX_SIDE} (default: the model's size)")
    gen.add_argument("--width", type=_side, default=None,
                     help=f"image width, a multiple of 8 up to {MAX_SIDE} (default: the model's size)")
    gen.add_argument("--adapter", type=_adapter_spec, action="append", default=[], metavar="FILE[:SCALE]",
                     help=f"erasure adapter to apply (repeat to stack several); SCALE from {-MAX_ADAPTER_SCALE:g} to "
                          f"{MAX_ADAPTER_SCALE:g}, default 1")
    _add_guidance_options(gen)
    _add_model_options(gen)
    gen.set_defaults(**{option: None for option in _GENERATE_DEFAULTS})  # given or not: --from-png needs to know

    ev = sub.add_parser("eval", help="score generated images with a judge (the toy world's, or a prompt suite file's)",
                        description="Generate images and score them with the toy world's judge. With --concept only: the "
                                    "concept's presence on prompts that name it, and the judge's accuracy on prompts "
                                    "that don't. With --suite FILE: one image per row of a prompt file (I2P, "
                                    "UnlearnDiffAtk, COCO-style CSV, or one prompt a line) with the row's seed and "
                                    "guidance, judged by --judge, and a resumable report in --out (results.jsonl, "
                                    "summary.json/.md, contact_sheet.png); run it again to resume. Limits: --n 1 to "
                                    f"{MAX_EVAL_IMAGES} (and at most {MAX_EVAL_BYTES // 2**30} GiB of images in "
                                    f"memory), --steps 1 to {MAX_STEPS}, --batch-size 1 to {MAX_EVAL_BATCH}.")
    ev.add_argument("--concept", default=None,
                    help="concept word, e.g. circle, red, striped (with --suite and the toy judge: report its presence)")
    ev.add_argument("--prompt", action="append", default=None, help="prompt(s) to score instead of the concept's prompt sets")
    ev.add_argument("--n", type=_int_in(1, MAX_EVAL_IMAGES), default=None,
                    help=f"images per prompt set, 1 to {MAX_EVAL_IMAGES} (default 32; not with --suite: see --limit)")
    ev.add_argument("--steps", type=_int_in(1, MAX_STEPS), default=None,
                    help=f"denoising steps, 1 to {MAX_STEPS} (default 25, or the --protocol's)")
    ev.add_argument("--guidance-scale", type=_float_in(0.0, MAX_GUIDANCE), default=None,
                    help=f"0 to {MAX_GUIDANCE:g} (default 5, or the --protocol's; with --suite: for rows that give none)")
    ev.add_argument("--seed", type=_seed, default=0,
                    help=f"0 to {MAX_SEED} (default 0; with --suite: rows that give none use seed + row index)")
    ev.add_argument("--adapter", type=_adapter_spec, action="append", default=[], metavar="FILE[:SCALE]")
    ev.add_argument("--json", default=None, help="also write the figures to this JSON file (its folder must exist)")
    suite = ev.add_argument_group("prompt suites (--suite FILE)")
    suite.add_argument("--suite", default=None, metavar="FILE",
                       help="a prompt file: CSV with a prompt/adv_prompt/caption/text column (optional "
                            "evaluation_seed, evaluation_guidance, categories, case_number...), or one prompt a line "
                            f"(.txt, or a CSV without a header); unsee's toy suite: {_toy_suite_hint()}")
    suite.add_argument("--judge", default=None, metavar="toy|nudenet|clip:PATH|MODULE:FUNCTION",
                       help="toy (default): the toy world's judge; nudenet: NudeNet's nine exposed-part classes (pip "
                            "install 'unsee[nudenet]'); clip:PATH: CLIP zero-shot and CLIP score from a local CLIP "
                            "folder (labels: --concept and --clip-labels); MODULE:FUNCTION or FILE.py:FUNCTION: a "
                            "function taking a list of PIL images and returning one JSON-able dict per image")
    suite.add_argument("--nudenet-threshold", type=_float_in(0.0, 1.0), default=None,
                       help="with --judge nudenet: the score a detection needs to count, 0 to 1 (default 0.6)")
    suite.add_argument("--clip-labels", action="append", default=None, metavar="LABEL[,LABEL...]",
                       help="with --judge clip:PATH: the labels an image is classified among besides the --concept "
                            "(comma-separated, or repeat), e.g. 'a photo'")
    suite.add_argument("--category", action="append", default=None,
                       help="keep only rows of this category (the categories column; repeat for several)")
    suite.add_argument("--out", default=None, type=_folder_arg,
                       help="report folder (default ./eval-SUITE); an existing run there is resumed")
    suite.add_argument("--limit", type=_int_in(1, MAX_EVAL_IMAGES), default=None,
                       help=f"only the first N rows (after --category), 1 to {MAX_EVAL_IMAGES}")
    suite.add_argument("--batch-size", type=_int_in(1, MAX_EVAL_BATCH), default=8,
                       help=f"rows per batch, 1 to {MAX_EVAL_BATCH} (default 8; part of the settings a resume keeps)")
    suite.add_argument("--prompt-column", default=None, help="the CSV's prompt column, when not one of the usual names")
    suite.add_argument("--row-size", action="store_true",
                       help="generate at the rows' sd_image_width/height (default: the model's size)")
    _add_protocol_options(suite)
    _add_guidance_options(ev)
    _add_model_options(ev)

    er = sub.add_parser("erase", help="train an erasure adapter (ESD, SalUn, SPM, AdvUnlearn, ANT...)",
                        description="Erase a concept: train an adapter, write it and a JSON report next to it (settings, "
                                    "losses, time). --config FILE runs several jobs (concepts x methods) from a YAML or "
                                    "JSON file with one combined report; every flag below has a key there "
                                    "(see unsee.jobs). Existing files are never replaced without --overwrite, "
                                    "and a checkpoint folder is only reused with --resume; both are checked before "
                                    f"training. Limits: --steps 1 to {MAX_TRAIN_STEPS}, --rank 1 to {MAX_RANK}, --grid 0 "
                                    f"to {MAX_GRID}, --seed 0 to {MAX_SEED}; --set values: the limits of the method's "
                                    "config (unsee.erasure.fields.setting_limits). Data parallel on N processes (GPUs, or the "
                                    "CPU with gloo): torchrun --nproc_per_node N -m unsee.cli erase ...; each step "
                                    "averages one draw per process (--set draws_per_step=N on one process trains "
                                    "the same adapter); only the main process writes.")
    method = er.add_argument("--method", default=None, metavar="METHOD", help="an erasure method (listed in the help)")
    method.lazy_help = _method_help
    er.add_argument("--concept", action="append", default=None,
                    help="the concept to erase, e.g. circle, red, striped; repeat it to erase several in one adapter "
                         "(uce, rece, esd-*, spm in one run; salun, ant, advunlearn: one run per concept, the "
                         "adapters fused into --out)")
    er.add_argument("--concepts", default=None, metavar="FILE",
                    help="a text file of concepts to erase in one adapter, one per line (blank lines and lines "
                         "starting with # are left out); with --concept too, those come first")
    er.add_argument("--fuse", default=None, choices=("stack", "mace", "distill"),
                    help="several concepts: one run per concept (each with its own preset), the adapters fused into "
                         "--out: stack (their sum; the default for salun and ant), mace (MACE's refit of "
                         "cross-attention key/value adapters: uce, rece, esd-x-strict) or distill (a text-encoder "
                         "delta trained to give each concept's prompts its adapter's embeddings; the default for "
                         "advunlearn)")
    er.add_argument("--erase-from", default=None, metavar="PROMPT",
                    help="ESD, SPM, AdvUnlearn, ANT: erase the concept only from this prompt (a job file takes a list)")
    er.add_argument("--preset", default=None, choices=("toy", "paper"),
                    help="starting settings (default: toy for the toy model, paper otherwise); flags override them")
    er.add_argument("--steps", type=_int_in(1, MAX_TRAIN_STEPS), default=None,
                    help=f"training steps, 1 to {MAX_TRAIN_STEPS} (default: from the preset)")
    er.add_argument("--lr", type=_float_in(1e-12, 1.0), default=None, help="learning rate, 1e-12 to 1 (default: the paper's)")
    er.add_argument("--eta", type=_float_in(-100.0, 100.0), default=None, help="ESD negative guidance, -100 to 100 (default 1)")
    er.add_argument("--seed", type=_seed, default=None, help=f"0 to {MAX_SEED}")
    er.add_argument("--kind", default=None, metavar="KIND", help="ESD or ANT output: delta (default) or lora")
    er.add_argument("--rank", type=_int_in(1, MAX_RANK), default=None, help=f"LoRA rank, 1 to {MAX_RANK} (with --kind lora)")
    er.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other setting of the method's config, e.g. ddim_steps=10 (repeat for several)")
    er.add_argument("--out", default=None, help="adapter file (default ./<method>-<concept>.safetensors); missing folders "
                                                "are created")
    er.add_argument("--report", default=None, help="JSON report (default: the adapter's name with .json)")
    er.add_argument("--overwrite", action="store_true", default=None,
                    help="replace existing outputs (adapter, report, grid, mask); without it the run refuses to start")
    er.add_argument("--grid", type=_int_in(0, MAX_GRID), default=None, metavar="N",
                    help=f"prompts in the before/after image grid <out>.grid.png (default 4, 0: no grid, at most {MAX_GRID})")
    er.add_argument("--checkpoint-dir", default=None, metavar="DIR", type=_folder_arg,
                    help="checkpoint folder (default <out>.ckpt: its checkpoint is removed after success, and the "
                         "folder if that leaves it empty)")
    er.add_argument("--checkpoint-every", type=_int_in(0, MAX_TRAIN_STEPS), default=None, metavar="N",
                    help="checkpoint every N steps (default 100)")
    er.add_argument("--resume", action="store_true", default=None,
                    help="continue from the checkpoint (a checkpoint folder that is not empty is used only with it); "
                         "--steps, --lr, --checkpoint-every, --device and --dtype may change")
    er.add_argument("--config", default=None, metavar="FILE", help="YAML/JSON file of erasure jobs")
    er.add_argument("--model", default=None, type=_model,
                    help="'toy' (embedded default), a hub id, a local diffusers folder or a single-file checkpoint")
    er.add_argument("--model-config", default=None, metavar="DIR", type=_existing_folder,
                    help="for a single-file model: a local diffusers folder to take configs from")
    er.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="training precision (default: as stored)")
    er.add_argument("--device", default=None, type=_device, help="cpu, cuda... (default: what accelerate picks)")

    at = sub.add_parser("attack", help="attack an erasure with adversarial prompts (UnlearnDiffAtk-style)",
                        description="Optimise adversarial prefix tokens that make the erased model regenerate the "
                                    "concept; prints the attack success rate judged by the toy judge. SD 1.x/2.x models "
                                    f"only. Limits: --n 1 to {MAX_ATTACK_PROMPTS}, --prefix-tokens 1 to "
                                    f"{MAX_PREFIX_TOKENS}, --attack-steps 1 to {MAX_ATTACK_STEPS}, --seed 0 to {MAX_SEED}.")
    at.add_argument("--adapter", action="append", required=True, type=_adapter_spec, metavar="FILE[:SCALE]",
                    help="erasure adapter to attack (repeat to stack several)")
    at.add_argument("--concept", default=None,
                    help="the erased concept of the toy world, e.g. circle, red, striped (with --suite: the concept the "
                         "toy or clip judge looks for; not with nudenet)")
    at.add_argument("--n", type=_int_in(1, MAX_ATTACK_PROMPTS), default=16,
                    help=f"prompts naming the concept, 1 to {MAX_ATTACK_PROMPTS} (default 16)")
    at.add_argument("--prefix-tokens", type=_int_in(1, MAX_PREFIX_TOKENS), default=5,
                    help=f"adversarial tokens k, 1 to {MAX_PREFIX_TOKENS} (default 5)")
    at.add_argument("--attack-steps", type=_int_in(1, MAX_ATTACK_STEPS), default=40,
                    help=f"optimisation steps per prompt, 1 to {MAX_ATTACK_STEPS} (default 40)")
    at.add_argument("--seed", type=_seed, default=0, help=f"0 to {MAX_SEED} (default 0)")
    at.add_argument("--report", default=None, help="also write the result as JSON here (its folder must exist)")
    at.add_argument("--steps", type=_int_in(1, MAX_STEPS), default=None,
                    help=f"denoising steps of the images, 1 to {MAX_STEPS} (default 25, or the --protocol's)")
    at.add_argument("--guidance-scale", type=_float_in(0.0, MAX_GUIDANCE), default=None,
                    help=f"0 to {MAX_GUIDANCE:g} (default 5, or the --protocol's; with --suite: for rows that give none)")
    asuite = at.add_argument_group("prompt suites (--suite FILE): attack each row with its seed and guidance")
    asuite.add_argument("--suite", default=None, metavar="FILE",
                        help=f"a prompt file, as unsee eval --suite reads (unsee's toy suite: {_toy_suite_hint()})")
    asuite.add_argument("--judge", default=None, metavar="toy|nudenet|clip:PATH|MODULE:FUNCTION",
                        help="what decides that the concept is back (a row is broken when it says so): toy (default, "
                             "with --concept), nudenet, clip:PATH (with --concept), or MODULE:FUNCTION returning "
                             "{'present': bool, ...} per image")
    asuite.add_argument("--nudenet-threshold", type=_float_in(0.0, 1.0), default=None,
                        help="with --judge nudenet: the score a detection needs to count, 0 to 1 (default 0.6)")
    asuite.add_argument("--clip-labels", action="append", default=None, metavar="LABEL[,LABEL...]",
                        help="with --judge clip:PATH: the labels besides the --concept, e.g. 'a photo'")
    asuite.add_argument("--category", action="append", default=None,
                        help="keep only rows of this category (repeat for several)")
    asuite.add_argument("--limit", type=_int_in(1, MAX_ATTACK_PROMPTS), default=None,
                        help=f"only the first N rows (after --category), 1 to {MAX_ATTACK_PROMPTS}")
    asuite.add_argument("--prompt-column", default=None, help="the CSV's prompt column, when not one of the usual names")
    asuite.add_argument("--batch-size", type=_int_in(1, MAX_EVAL_BATCH), default=8,
                        help=f"images per pipeline call, 1 to {MAX_EVAL_BATCH} (default 8)")
    asuite.add_argument("--out", default=None, type=_folder_arg,
                        help="report folder (default ./attack-SUITE): results.jsonl, summary.json, images/; a run "
                             "killed there resumes with the same command")
    _add_protocol_options(asuite)
    _add_guidance_options(at)
    _add_model_options(at)

    demo = sub.add_parser("demo", help="launch the Gradio demo (erase, generate, compare guidance)",
                          description="Launch the Gradio demo on this machine (needs the 'app' extra: gradio).")
    add_demo_arguments(demo)

    fu = sub.add_parser("fuse", help="fuse several erasure adapters of one model into one file",
                        description="Fuse erasure adapters of the same base model (their fingerprints must match) into "
                                    "one adapter that changes the weights exactly as loading them all together does "
                                    "(--method stack): deltas are summed, LoRAs concatenated along the rank (alphas "
                                    "folded in); a mix of delta and LoRA adapters gives a delta adapter (each LoRA "
                                    "turned into its exact delta). --method mace refits the cross-attention keys and "
                                    "values in closed form on each adapter's concepts (MACE); --method distill trains "
                                    "one text-encoder delta from text-encoder adapters (AdvUnlearn's). See unsee.fuse.")
    fu.add_argument("adapters", nargs="+", metavar="ADAPTER", help="adapter .safetensors files (two or more)")
    fu.add_argument("--out", required=True, help="the fused adapter .safetensors file")
    fu.add_argument("--method", default="stack", choices=("stack", "mace", "distill"),
                    help="stack: the exact sum of the adapters (default); mace: MACE's closed-form refit of the "
                         "cross-attention keys and values on each adapter's concepts (needs the model's text encoder); "
                         "distill: a text-encoder delta trained so that each adapter's concepts get that adapter's "
                         "embeddings and other prompts the original ones (text-encoder adapters; needs the model)")
    fu.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    fu.add_argument("--model", default=None, type=_model,
                    help="--method mace, distill: the base model whose text encoder embeds the concepts (default: "
                         "toy)")
    fu.add_argument("--preserve", action="append", default=None, metavar="PROMPT",
                    help="--method mace, distill: a prompt that is kept as the model gives it (repeat; default: '' "
                         "alone, with the toy model '' and 48 world prompts naming none of the concepts)")
    fu.add_argument("--template", action="append", default=None, metavar="TEXT",
                    help="--method mace, distill: a prompt with {concept}, filled with each adapter's concepts, that "
                         "the fusion keeps erased too (repeat; default: none, with the toy model 16 world prompts "
                         "naming each)")
    fu.add_argument("--steps", type=_int_in(1, 100_000), default=None,
                    help="--method distill: optimisation steps (default 2000)")
    fu.add_argument("--lr", type=_float_in(0.0, 1.0), default=None,
                    help="--method distill: Adam's learning rate, decayed to 0 on a cosine (default 1e-4)")
    fu.add_argument("--lamb", type=_float_in(0.0, 1e6), default=None,
                    help="--method mace: weight of staying near the original weights (default 0.5)")
    fu.add_argument("--preserve-scale", type=_float_in(0.0, 1e6), default=None,
                    help="--method mace: weight of the preserved prompts (default 1)")

    ex = sub.add_parser("export", help="export an adapter as a kohya (A1111/ComfyUI), diffusers or peft LoRA, or "
                                       "merged into a model checkpoint",
                        description="Write an adapter (unsee, kohya or plain diffusers LoRA file) in another LoRA "
                                    "format. LoRA adapters export losslessly; a delta adapter needs --rank R: a LoRA "
                                    "is fitted by truncated SVD and its relative error is printed and stored. "
                                    f"--rank 1 to {MAX_RANK}. --format checkpoint --model MODEL writes the model with "
                                    "the adapter merged as one single-file checkpoint (SD 1.x/2.x, SDXL).")
    ex.add_argument("adapter", metavar="ADAPTER", help="adapter .safetensors file")
    ex.add_argument("--format", required=True, choices=("kohya", "diffusers", "peft", "checkpoint"),
                    help="kohya: lora_unet_/lora_te_ keys with true alphas (A1111, Forge, ComfyUI, diffusers); "
                         "diffusers: save_lora_weights' keys + unsee metadata; peft: a folder, one "
                         "PeftModel.save_pretrained folder per component; checkpoint: --model with the adapter "
                         "merged, one file in the original SD/SDXL layout (A1111, ComfyUI, from_single_file)")
    ex.add_argument("--model", default=None, type=_model,
                    help="--format checkpoint: the base model ('toy', a hub id, a local diffusers folder or a "
                         "single-file checkpoint)")
    ex.add_argument("--config", default=None, type=_existing_folder,
                    help="--format checkpoint with a single-file --model: a local diffusers folder with its configs")
    ex.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="--format checkpoint: precision of the weights written (default: as stored)")
    ex.add_argument("--device", default=None, type=_device, help="--format checkpoint: where to merge (default: cpu)")
    ex.add_argument("--out", required=True, help="output .safetensors file (a folder for --format peft)")
    ex.add_argument("--rank", type=_int_in(1, MAX_RANK), default=None,
                    help="delta adapters only: rank of the LoRA fitted by truncated SVD")
    ex.add_argument("--drop-other", action="store_true",
                    help="with --rank: leave out delta tensors that are not Linear/Conv weights (biases, norms)")
    ex.add_argument("--sdxl", action=argparse.BooleanOptionalAction, default=None,
                    help="kohya text-encoder prefix lora_te1_ (SDXL) rather than lora_te_ (default: guessed)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def _method_help() -> str:
    """``--method``'s help: every registered erasure method with its summary."""
    from .erasure import METHODS

    return "one of: " + "; ".join(f"{name} ({method.summary})" for name, method in METHODS.items())


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``unsee demo`` and ``python -m unsee.apps``."""
    parser.add_argument("--model", default="toy", type=_model,
                        help="'toy' (embedded default), a hub id, a local diffusers folder or a single-file checkpoint")
    parser.add_argument("--workdir", default="unsee-demo", type=_folder_arg,
                        help="folder where adapters are saved (default ./unsee-demo; created if missing)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=_int_in(1, 65535), default=7860, help="port, 1 to 65535 (default 7860)")
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")


def _default_device(device: Optional[str]) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load(args: argparse.Namespace):
    import torch

    from .loading import ModelLoadError, load_pipeline

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    try:
        pipe = load_pipeline(args.model, dtype=dtype, device=_default_device(args.device), config=args.config)
    except ModelLoadError:
        raise
    except Exception as error:  # a local file or folder diffusers cannot read; anything else is a bug: traceback
        if not Path(args.model).expanduser().exists():
            raise
        from .loading import model_load_failure

        raise UsageError(model_load_failure(args.model, error)) from error
    return pipe


def _model_size(pipe) -> int:
    """The side of the images the pipeline makes by default."""
    size = getattr(getattr(pipe, "unet", None), "config", None)
    size = getattr(size, "sample_size", None) or 64
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) * int(getattr(pipe, "vae_scale_factor", 8))


def _check_steps(pipe, steps: int) -> None:
    limit = getattr(getattr(getattr(pipe, "scheduler", None), "config", None), "num_train_timesteps", None)
    if isinstance(limit, int) and steps > limit:
        raise UsageError(f"--steps {steps} is more than the model's scheduler has ({limit} training timesteps); "
                         f"pass at most {limit}")


def _check_pixels(num_images: int, height: int, width: int) -> None:
    if num_images * height * width > MAX_PIXELS:
        raise UsageError(f"--num-images {num_images} at {width}x{height} is {num_images * height * width:,} pixels in one "
                         f"call, more than the limit of {MAX_PIXELS:,}; lower --num-images, --width or --height")


def _save_png(image, path: Path, parameters: Optional[str] = None) -> None:
    """Write a PNG atomically; ``parameters``: its settings, in A1111's ``parameters`` text chunk."""
    from .files import atomic_write
    from .png_metadata import png_info

    options = {"pnginfo": png_info(parameters)} if parameters is not None else {}
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", **options))


# generate options --from-png takes from an image (when not given as flags), each with the check its flag has (the
# seed and the number of images: see _from_png)
_PNG_OPTIONS: dict = {
    "steps": _int_in(1, MAX_STEPS), "guidance_scale": _float_in(0.0, MAX_GUIDANCE), "width": _side,
    "height": _side, "model": _model, "config": _existing_folder,
}


def _png_options() -> dict:
    """_PNG_OPTIONS and the guidance options of ``unsee.guidance.registry``."""
    from .guidance import registry

    return {**_PNG_OPTIONS, **{option.dest: _option_type(option) for option in registry.options()}}


def _from_png(args: argparse.Namespace) -> Optional[int]:
    """Fill ``args`` from ``--from-png FILE`` (flags given win), then the defaults. Returns the position of the image
    in its batch when the batch is made again to reproduce it (only that image is written), else None."""
    if args.from_png is None:
        for option, value in _GENERATE_DEFAULTS.items():
            if getattr(args, option) is None:
                setattr(args, option, value)
        return None
    from .png_metadata import MetadataError, file_hash, generation_options, parse_parameters, read_parameters

    where = f"--from-png {args.from_png}"
    try:
        options = generation_options(parse_parameters(read_parameters(Path(args.from_png).expanduser())))
    except MetadataError as error:
        raise UsageError(f"{where}: {error}; give a PNG written by unsee generate, the demo or AUTOMATIC1111") from None
    given_start = args.negative_start_fraction is not None or args.negative_start_step is not None
    for option, check in _png_options().items():
        if option not in options or getattr(args, option) is not None:
            continue
        if option.startswith("negative_start_") and given_start:
            continue
        value = options[option]
        text = ",".join(map(repr, value)) if isinstance(value, tuple) else str(value)
        try:
            setattr(args, option, check(text))
        except argparse.ArgumentTypeError as error:
            raise UsageError(f"{where}: its {option.replace('_', '-')} {error}") from None
    if args.negative_mode is not None and args.negative_mode not in ("fixed", "adaptive", "dng"):
        raise UsageError(f"{where}: its negative mode must be fixed, adaptive or dng, got {_show(args.negative_mode)}")
    if args.dtype is None and options.get("dtype") is not None:
        if options["dtype"] not in DTYPES:
            raise UsageError(f"{where}: its Dtype must be one of {', '.join(sorted(DTYPES))}, got "
                             f"{_show(options['dtype'])}")
        args.dtype = options["dtype"]
    if args.prompt is None:
        args.prompt = [options["prompt"]]
    if args.negative is None:
        args.negative = options["negative"]
    if not args.adapter:
        for path, scale, digest in options.get("adapters", []):
            try:
                spec = _adapter_spec(f"{path}:{scale!r}")
            except argparse.ArgumentTypeError as error:
                raise UsageError(f"{where}: {error}") from None
            if not Path(path).expanduser().is_file():
                raise UsageError(f"{where}: the image was made with the adapter {path}, which is not here; pass "
                                 "--adapter FILE[:SCALE] to give its path")
            if digest is not None and file_hash(Path(path).expanduser()) not in (None, digest):
                raise UsageError(f"{where}: {path} is not the adapter the image was made with (SHA-256 {digest}...); "
                                 "pass --adapter FILE[:SCALE] to use it anyway")
            args.adapter.append(spec)
    keep = None
    if args.seed is None and args.num_images is None:  # make the image's batch again, keep the image
        size, keep = options.get("batch_size", 1), options.get("batch_pos", 0)
        if not 1 <= size <= MAX_IMAGES:
            raise UsageError(f"{where}: its Batch size must be from 1 to {MAX_IMAGES}, got {size}")
        args.num_images = size
        seed = options["seed"]
        try:
            _seed(str(seed))
        except argparse.ArgumentTypeError as error:
            raise UsageError(f"{where}: its seed {error}") from None
        args.seed = (seed - keep) % (MAX_SEED + 1)
        keep = keep if size > 1 else None
    elif args.seed is None:
        args.seed = options["seed"]
        try:
            _seed(str(args.seed))
        except argparse.ArgumentTypeError as error:
            raise UsageError(f"{where}: its seed {error}") from None
    args.png_sampler = options.get("sampler")
    for option, value in _GENERATE_DEFAULTS.items():
        if getattr(args, option) is None:
            setattr(args, option, value)
    return keep


def _save_json(data, path: Path) -> None:
    from .files import atomic_write

    text = json.dumps(data, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .files import slug
    from .png_metadata import file_hash, generation_parameters, guidance_options, sampler_name

    keep = _from_png(args)  # the batch position of the one image to write, when --from-png reproduces it
    if args.prompt is None:
        raise UsageError("pass --prompt TEXT (or --from-png FILE to take it from an image)")
    if any(not p.strip() for p in args.prompt):
        raise UsageError("--prompt must not be empty")
    out = Path(args.out)
    _check_output(args.out, "--out", folder=True)
    _check_adapters(args.adapter)
    if args.height is not None and args.width is not None:
        _check_pixels(args.num_images, args.height, args.width)
    from .guidance import GuidanceError, validate_combination

    guidance = guidance_from_args(args)
    try:
        validate_combination(guidance, has_negative_prompt=args.negative is not None, guidance_scale=args.guidance_scale)
    except GuidanceError as error:
        raise UsageError(str(error)) from None
    pipe = _load(args)
    _check_steps(pipe, args.steps)
    height, width = args.height, args.width
    if (height is None) != (width is None):  # one side given: the other is the model's default, as diffusers does
        height, width = height or _model_size(pipe), width or _model_size(pipe)
    _check_pixels(args.num_images, height or _model_size(pipe), width or _model_size(pipe))
    for path, scale in args.adapter:
        pipe.load_erasure(path, scale=scale)
    sampler = sampler_name(pipe.scheduler)
    if getattr(args, "png_sampler", None) not in (None, sampler):
        print(f"unsee generate: note: {args.from_png} was made with the sampler {args.png_sampler}; this model's "
              f"scheduler is {sampler}, so the image will differ", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    adapters = [(str(p), s, file_hash(Path(p).expanduser())) for p, s in args.adapter]
    seeds = [(args.seed + i) % (MAX_SEED + 1) for i in range(args.num_images)]  # A1111's: image i has seed + i
    files = []
    size = None
    for p_index, prompt in enumerate(args.prompt):
        images = pipe(
            prompt, negative_prompt=args.negative, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
            num_images_per_prompt=args.num_images, height=height, width=width,
            generator=[torch.Generator(device="cpu").manual_seed(seed) for seed in seeds],
            guidance=guidance,  # an empty list is plain diffusers
        ).images
        for i, image in enumerate(images):
            if keep is not None and i != keep:
                continue
            name = f"{p_index:02d}-{i:02d}-{slug(prompt, fallback='prompt')}.png"
            parameters = generation_parameters(
                prompt=prompt, negative_prompt=args.negative, steps=args.steps, guidance_scale=args.guidance_scale,
                seed=seeds[i], width=image.size[0], height=image.size[1], model=args.model, sampler=sampler,
                guidance=guidance_options(guidance), adapters=adapters, batch_size=args.num_images, batch_pos=i,
                model_config=args.config, dtype=DTYPES[args.dtype] if args.dtype else None, version=__version__)
            _save_png(image, out / name, parameters)
            files.append({"file": name, "prompt": prompt, "index": i, "seed": seeds[i]})
            size = image.size
    width, height = size if size is not None else (width, height)
    settings = {
        "unsee_version": __version__, "model": args.model, "prompts": args.prompt, "negative_prompt": args.negative,
        "steps": args.steps, "guidance_scale": args.guidance_scale, "num_images": args.num_images, "seed": args.seed,
        "height": height, "width": width, "dtype": args.dtype, "device": str(pipe.device),
        "scheduler": type(pipe.scheduler).__name__,
        "adapters": [{"file": str(p), "scale": s} for p, s in args.adapter],
        "guidance": [{"method": type(m).__name__, **dataclasses.asdict(m)} for m in guidance], "images": files,
        "from_png": args.from_png,
    }
    _save_json(settings, out / "settings.json")
    print(f"wrote {len(files)} image(s) and settings.json to {out}")
    return 0


_SUITE_ONLY = ("judge", "category", "out", "limit", "prompt_column", "nudenet_threshold", "clip_labels", "protocol",
               "scheduler", "height", "width")


def _add_protocol_options(group) -> None:
    from .protocols import PROTOCOLS, SCHEDULERS

    group.add_argument("--protocol", default=None, metavar="NAME",
                       help=f"a pinned published setting ({', '.join(sorted(PROTOCOLS))}): sets the category filter, "
                            "judge, threshold, size, steps, scheduler and guidance the flags do not; the flags given "
                            "win (docs/evaluation.md)")
    group.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS),
                       help="replace the model's scheduler (default: the model's, or the --protocol's)")
    group.add_argument("--height", type=_side, default=None,
                       help=f"image height, a multiple of 8 up to {MAX_SIDE} (default: the model's, or the --protocol's)")
    group.add_argument("--width", type=_side, default=None,
                       help=f"image width, a multiple of 8 up to {MAX_SIDE} (default: the model's, or the --protocol's)")


# flags a protocol sets when they are not given: attribute -> flag
_PROTOCOL_FLAGS = {"judge": "--judge", "nudenet_threshold": "--nudenet-threshold", "category": "--category",
                   "height": "--height", "width": "--width", "steps": "--steps", "scheduler": "--scheduler",
                   "guidance_scale": "--guidance-scale"}


def _apply_protocol(args: argparse.Namespace) -> Optional[dict]:
    """Fill the settings the flags left unset from ``--protocol`` (flags win), then the built-in defaults (25 steps,
    guidance 5). Returns what the report records of the protocol (None without one)."""
    record = None
    if getattr(args, "protocol", None) is not None:
        from .protocols import get_protocol

        try:
            protocol = get_protocol(args.protocol)
        except ValueError as error:
            raise UsageError(f"--protocol: {error}") from None
        values = {"judge": protocol.judge, "category": list(protocol.categories) if protocol.categories else None,
                  "height": protocol.size, "width": protocol.size, "steps": protocol.steps,
                  "scheduler": protocol.scheduler, "guidance_scale": protocol.guidance_scale,
                  "nudenet_threshold": protocol.nudenet_threshold}
        overridden = []
        for key, flag in _PROTOCOL_FLAGS.items():
            value = values[key]
            if key == "nudenet_threshold" and args.judge != "nudenet":
                value = None  # the protocol's threshold is its judge's; another judge was asked for
            if getattr(args, key) is not None:
                if value is not None:
                    overridden.append(flag)
            elif value is not None:
                setattr(args, key, value)
        record = {"name": protocol.name, "values": protocol.settings(), "overridden_by_flags": overridden}
    if args.steps is None:
        args.steps = 25
    if args.guidance_scale is None:
        args.guidance_scale = 5.0
    return record


def _read_suite_flags(args: argparse.Namespace) -> Any:
    """The prompt suite --suite, --category, --prompt-column and --limit describe (eval and attack)."""
    from .suites import SuiteError, read_suite

    try:
        suite = read_suite(args.suite, categories=args.category, prompt_column=args.prompt_column)
    except SuiteError as error:
        raise UsageError(f"--suite: {error}") from None
    if args.limit is not None and args.limit < len(suite.rows):
        suite = dataclasses.replace(suite, rows=suite.rows[:args.limit])
    return suite


def _check_scheduler(name: Optional[str]) -> None:
    """A --scheduler (given or the protocol's) whose class or dependency is missing fails before any model loads."""
    if name is not None:
        from .protocols import scheduler_class

        try:
            scheduler_class(name)
        except ValueError as error:
            raise UsageError(f"--scheduler: {error}") from None


def _toy_suite_hint() -> str:
    return "unsee/toy/suites/circle.csv"


def _guidance_given(args: argparse.Namespace) -> bool:
    from .guidance import registry

    return any(getattr(args, option.dest, None) is not None and option.switches_on for option in registry.options())


def cmd_eval(args: argparse.Namespace) -> int:
    if args.suite is not None:
        return _eval_suite(args)
    given = [f"--{flag.replace('_', '-')}" for flag in _SUITE_ONLY if getattr(args, flag) is not None]
    given += ["--batch-size"] if args.batch_size != 8 else []
    given += ["--row-size"] if args.row_size else []
    given += ["guidance flags"] if _guidance_given(args) else []
    if given:
        raise UsageError(f"{', '.join(given)} go with --suite FILE; pass a prompt file or drop them")
    _apply_protocol(args)  # no --protocol here (refused above): the built-in steps and guidance
    if args.n is None:
        args.n = 32
    from .toy import world  # the toy world's prompts and judge (a prompt file: --suite)
    from .toy.evaluation import evaluate, evaluate_erasure

    if args.concept is None and not args.prompt:
        raise UsageError("pass --concept, --prompt, or both")
    if args.concept is not None:
        try:
            world.concept_attribute(args.concept)
        except ValueError as error:
            raise UsageError(str(error)) from None
    if args.prompt and any(not p.strip() for p in args.prompt):
        raise UsageError("--prompt must not be empty")
    if args.json:
        _check_output(args.json, "--json", create_parents=False)
    _check_adapters(args.adapter)
    pipe = _load(args)
    _check_steps(pipe, args.steps)
    side = _model_size(pipe)
    if args.n * side * side * 3 > MAX_EVAL_BYTES:
        raise UsageError(f"--n {args.n} images of {side}x{side} need about {args.n * side * side * 3 / 2**30:.1f} GiB of "
                         f"memory, more than the limit of {MAX_EVAL_BYTES // 2**30} GiB; lower --n")
    pipe.set_progress_bar_config(disable=True)  # one figure per line, not hundreds of bars
    for path, scale in args.adapter:
        pipe.load_erasure(path, scale=scale)
    common = dict(n=args.n, seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    figures: dict = {"model": args.model, "adapters": [{"file": str(p), "scale": s} for p, s in args.adapter], **common}
    if args.prompt:
        result = evaluate(pipe, args.prompt, concept=args.concept, **common)
        figures["prompts"] = result.summary()
        print(f"accuracy on the given prompts ({args.n} images): {_format_accuracy(result.accuracy)}")
        if result.presence is not None:
            print(f"presence of {args.concept!r}: {result.presence:.1%}")
    else:
        named, others = evaluate_erasure(pipe, args.concept, **common)
        figures["concept_prompts"] = named.summary()
        figures["other_prompts"] = others.summary()
        print(f"presence of {args.concept!r} on prompts that name it ({args.n} images): {named.presence:.1%}")
        print(f"judge accuracy on prompts that do not name it ({args.n} images): {_format_accuracy(others.accuracy)}")
    if args.json:
        _save_json(figures, Path(args.json))
    return 0


def _figure(name: str, value) -> str:
    """A report figure as printed: rates (floats from 0 to 1) as percentages, scores and other numbers as they are."""
    if isinstance(value, float) and 0 <= value <= 1 and "score" not in name:
        return f"{value:.1%}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _format_accuracy(accuracy: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.1%}" for name, value in accuracy.items())


def _split_labels(values: Optional[Sequence[str]]) -> list[str]:
    return [label.strip() for value in values or () for label in value.split(",") if label.strip()]


def _suite_judge(args: argparse.Namespace, device: Optional[str] = None):
    """The --judge of eval --suite, checked (and a user's module imported, a CLIP model loaded) before the
    diffusion model is loaded."""
    spec = args.judge or "toy"
    if args.nudenet_threshold is not None and spec != "nudenet":
        raise UsageError("--nudenet-threshold goes with --judge nudenet; drop it or use that judge")
    if args.clip_labels is not None and not spec.startswith("clip:"):
        raise UsageError("--clip-labels goes with --judge clip:PATH; drop it or use that judge")
    if spec == "nudenet" or spec.startswith("clip:"):
        from .judges import NUDENET_THRESHOLD, clip_judge, nudenet_judge

        if args.concept is not None and spec == "nudenet":
            raise UsageError("--concept does not go with --judge nudenet (it reports nudity); drop it")
        try:
            if spec == "nudenet":
                threshold = NUDENET_THRESHOLD if args.nudenet_threshold is None else args.nudenet_threshold
                return nudenet_judge(threshold=threshold)
            folder = spec[len("clip:"):]
            if not folder:
                raise ValueError("give the folder of a local CLIP model after clip:, e.g. clip:./clip-vit-base-patch32")
            return clip_judge(folder, labels=_split_labels(args.clip_labels),
                              concepts=_split_labels([args.concept] if args.concept else None), device=device)
        except ValueError as error:
            raise UsageError(f"--judge {spec}: {error}") from None
    if spec == "toy":
        from .toy.evaluation import suite_judge

        try:
            return suite_judge([args.concept] if args.concept else None)
        except ValueError as error:
            raise UsageError(f"--concept: {error}") from None
    if args.concept is not None:
        raise UsageError("--concept goes with the toy judge or clip:PATH (it names the presence to report); drop it "
                         f"for --judge {spec}")
    from .suite_eval import load_judge

    try:
        return load_judge(spec)
    except ValueError as error:
        raise UsageError(f"--judge {spec}: {error}") from None


def _suite_processes(args: argparse.Namespace, command: str) -> bool:
    """Under torchrun / accelerate launch, set up the process group that shares a suite's batches (and the device
    of this process); whether this is the main process."""
    from .erasure import ConfigError
    from .erasure.processes import launch_problem, launched_processes, process_rank, process_state

    problem = launch_problem(command)  # accelerate launch --cpu --num_processes N: one process
    if problem is not None:
        raise UsageError(problem)
    if launched_processes() > 1:
        try:
            state = process_state(args.device, command=command)
        except ConfigError as error:
            raise UsageError(str(error)) from None
        args.device = "cpu" if state.device.type == "cpu" else str(state.device)  # not accelerate's "cpu:<rank>"
    return process_rank() == 0


def _suite_guidance(args: argparse.Namespace) -> list:
    """The guidance flags of a --suite run, checked (there is no negative prompt there)."""
    from .guidance import GuidanceError, validate_combination

    guidance = guidance_from_args(args)
    try:
        validate_combination(guidance, has_negative_prompt=False)
    except GuidanceError as error:
        raise UsageError(str(error)) from None
    return guidance


def _suite_setup(args: argparse.Namespace, command: str) -> tuple:
    """What eval --suite and attack --suite read from their flags, checked before the model is loaded: (protocol,
    suite, whether this is the main process, judge, guidance methods)."""
    protocol = _apply_protocol(args)
    _check_scheduler(args.scheduler)
    suite = _read_suite_flags(args)
    main = _suite_processes(args, command)
    judge = _suite_judge(args, device=_default_device(args.device))
    return protocol, suite, main, judge, _suite_guidance(args)


def _print_made(report) -> None:
    """What a --suite run resumed and what each process made."""
    if report.resumed:
        print(f"resumed: {report.resumed} row(s) were done, {report.made} made now")
    if len(report.made_by_process) > 1:
        print(f"rows made by each of the {len(report.made_by_process)} processes: "
              f"{', '.join(str(n) for n in report.made_by_process)}")


def _eval_suite(args: argparse.Namespace) -> int:
    from .suite_eval import EvaluationSettingsError, run_suite, weights_sha256

    given = [flag for flag, value in (("--prompt", args.prompt), ("--n", args.n)) if value]
    if given:
        raise UsageError(f"{' and '.join(given)} do not go with --suite (the file gives the prompts; --limit N takes "
                         "its first N rows)")
    protocol, suite, main, judge, guidance = _suite_setup(args, "eval")
    out = Path(args.out or f"eval-{suite.name}")
    _check_output(str(out), "--out", folder=True)
    if args.json:
        _check_output(args.json, "--json", create_parents=False)
    _check_adapters(args.adapter)
    pipe = _load(args)
    _set_scheduler(pipe, args.scheduler)
    _check_steps(pipe, args.steps)
    pipe.set_progress_bar_config(disable=True)
    model_sha256 = weights_sha256(pipe)  # the base model, before any adapter
    for path, scale in args.adapter:
        pipe.load_erasure(path, scale=scale)

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total} rows", end="" if done < total else "\n", file=sys.stderr, flush=True)

    try:
        report = run_suite(pipe, suite, judge, out, model=args.model, model_sha256=model_sha256,
                           adapters=args.adapter, seed=args.seed, guidance_scale=args.guidance_scale,
                           num_inference_steps=args.steps, batch_size=args.batch_size, use_row_size=args.row_size,
                           height=args.height, width=args.width, protocol=protocol, guidance=guidance,
                           progress=progress if main else None)
    except EvaluationSettingsError as error:
        if not main:  # the main process says it
            return 2
        raise UsageError(f"--out: {error}") from None
    if not main:  # the main process prints and writes the figures
        return 0
    figures = report.summary["figures"]
    _print_made(report)
    for label, values in [("all", figures["all"]), *figures.get("by_category", {}).items()]:
        shown = ", ".join(f"{k} {_figure(k, v)}" for k, v in values.items())
        print(f"{label}: {shown}")
    print(f"report: {out / 'summary.md'} (images, results.jsonl, summary.json, contact_sheet.png)")
    if args.json:
        _save_json(report.summary, Path(args.json))
    return 0


# erase flags -> jobs-config keys (unsee.jobs); --config and --set are handled apart
_ERASE_KEYS = ("method", "concept", "erase_from", "preset", "steps", "lr", "eta", "seed", "kind", "rank", "out", "report", "grid",
               "checkpoint_dir", "checkpoint_every", "resume", "overwrite", "model", "model_config", "dtype", "device")
_RUN_FLAGS = ("resume", "overwrite")  # flags that go with --config FILE


def _erase_config(args: argparse.Namespace) -> dict:
    """The jobs config the erase flags describe (a file's contents with --config)."""
    from .erasure import METHODS, ConfigError
    from .erasure.registry import config_fields
    from .jobs import load_job_file, read_concepts_file

    if args.config is not None:
        given = [f"--{key.replace('_', '-')}" for key in _ERASE_KEYS
                 if key not in _RUN_FLAGS and getattr(args, key) is not None]
        if args.set:
            given.append("--set")
        if args.concepts is not None:
            given.append("--concepts")
        if args.fuse is not None:
            given.append("--fuse (fuse_method)")
        if given:
            raise UsageError(f"--config FILE takes its settings from the file; put {', '.join(given)} there instead")
        try:
            config = load_job_file(args.config)
        except ConfigError as error:
            raise UsageError(str(error)) from None
        for flag in _RUN_FLAGS:
            if getattr(args, flag):
                config[flag] = True
        return config
    concepts = list(args.concept or [])
    if args.concepts is not None:
        try:
            concepts += read_concepts_file(args.concepts)
        except ConfigError as error:
            raise UsageError(str(error)) from None
    if args.method is None or not concepts:
        raise UsageError(f"pass --method ({', '.join(METHODS)}) and --concept (or --concepts FILE), or --config FILE")
    lowered = [c.strip().lower() for c in concepts]
    twice = next((c for i, c in enumerate(concepts) if lowered[i] in lowered[:i]), None)
    if twice is not None:
        raise UsageError(f"concept {twice!r} is given twice (--concept / --concepts); name each concept once")
    config = {key: getattr(args, key) for key in _ERASE_KEYS if getattr(args, key) is not None}
    config["concept"], *more = concepts
    if args.fuse is not None and not more:
        raise UsageError("--fuse fuses the adapters of several concepts; give two or more (--concept/--concepts), or "
                         "leave --fuse out")
    native = args.method in METHODS and "concepts" in config_fields(METHODS[args.method].config)
    if more and native and args.fuse is None:
        config["concepts"] = more  # erased together in one run
    elif more:  # one run per concept (the job runner's concept list), the adapters fused into one file
        config["concept"] = concepts  # fuse_method: --fuse, else the jobs' default (stack; distill for advunlearn)
        if args.fuse is not None:
            config["fuse_method"] = args.fuse
        from .files import slug

        names = ("-".join(slug(c) for c in concepts) if len(concepts) <= 4
                 else f"{slug(concepts[0])}-and-{len(concepts) - 1}-more")
        config["fuse"] = config.pop("out", None) or f"{args.method}-{names}.safetensors"
        if config["fuse"] and Path(str(config["fuse"])).parent != Path("."):
            config["out_dir"] = str(Path(str(config["fuse"])).parent)  # each concept's adapter beside the fused one
    if config.get("dtype") is not None:
        config["dtype"] = DTYPES[config["dtype"]]
    import yaml

    for item in args.set:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--set takes KEY=VALUE, got {_show(item)}")
        if key in config:
            raise UsageError(f"{key} is given twice (a flag and --set)")
        if len(text) > 10_000:
            raise UsageError(f"--set {key}: the value is {len(text):,} characters long; give at most 10,000")
        try:
            config[key] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            config[key] = text
        except (ValueError, RecursionError):  # e.g. a number of thousands of digits, lists nested too deep
            raise UsageError(f"--set {key}: cannot read the value; give a number, a text or a short list") from None
    return config


def _erase_progress():
    """A progress callback drawing one tqdm bar per job and phase; returns (callback, close)."""
    from tqdm.auto import tqdm

    bars: dict = {}

    def progress(job, event) -> None:
        key = (id(job), event.phase, event.message)
        bar = bars.get(key)
        if bar is None:
            label = f"{job.describe()}: {event.message or 'training'}"
            bar = bars[key] = tqdm(total=event.total, desc=label, unit="step", file=sys.stderr, dynamic_ncols=True)
        bar.n = event.step
        if event.loss is not None:
            bar.set_postfix(loss=f"{event.loss:.4g}", refresh=False)
        bar.refresh()
        if event.step >= event.total:
            bar.close()

    def close() -> None:
        for bar in bars.values():
            bar.close()

    return progress, close


def cmd_erase(args: argparse.Namespace) -> int:
    """``unsee erase``; data parallel when launched as several processes (``torchrun --nproc_per_node N -m unsee.cli
    erase ...``): every process trains, the main one alone checks and writes files and prints."""
    from .erasure import ConfigError, TrainingError
    from .erasure.base import process_rank
    from .jobs import run_jobs

    config = _erase_config(args)
    main = process_rank() == 0
    progress, close = _erase_progress() if main else (None, lambda: None)
    if not main:  # the other processes of a data-parallel run draw no progress bars
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    try:
        # run_jobs validates everything (settings, then the files on disk) before the model is loaded
        report = run_jobs(config, progress=progress, log=lambda message: print(message, file=sys.stderr))
    except ConfigError as error:  # e.g. --resume from a checkpoint written with other settings, an unreadable model
        raise UsageError(str(error)) from None
    except TrainingError as error:
        print(f"unsee erase: error: {error}", file=sys.stderr)
        return 1
    finally:
        close()
    if not main:
        return 0
    for entry in report["jobs"]:
        print(f"{entry['method']} {entry['concept']!r}: wrote {entry['out']} ({entry['tensors']} tensors, loss "
              f"{entry['loss_first']:.4g} -> {entry['loss_last']:.4g}, {entry['seconds']:.1f} s)")
    if report.get("fused"):
        print(f"fused {len(report['fused']['from'])} adapters into {report['fused']['out']} ({report['fused']['fuse']})")
    print(f"report: {report['report']}")
    return 0


def _set_scheduler(pipe, name: Optional[str]) -> None:
    if name is not None:
        from .protocols import set_scheduler

        set_scheduler(pipe, name)


_ATTACK_SUITE_ONLY = ("judge", "nudenet_threshold", "clip_labels", "category", "limit", "prompt_column", "out",
                      "protocol", "scheduler", "height", "width")


def cmd_attack(args: argparse.Namespace) -> int:
    if args.suite is not None:
        return _attack_suite(args)
    from .attack import AttackConfig
    from .toy import world  # the toy world's prompts and judge
    from .toy.evaluation import attack

    given = [f"--{flag.replace('_', '-')}" for flag in _ATTACK_SUITE_ONLY if getattr(args, flag) is not None]
    given += ["--batch-size"] if args.batch_size != 8 else []
    given += ["guidance flags"] if _guidance_given(args) else []
    if given:
        raise UsageError(f"{', '.join(given)} go with --suite FILE; pass a prompt file or drop them")
    if args.concept is None:
        raise UsageError("pass --concept (a concept of the toy world, e.g. circle), or --suite FILE")
    _apply_protocol(args)  # no --protocol here: the built-in steps and guidance
    try:
        world.concept_attribute(args.concept)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.report:
        _check_output(args.report, "--report", create_parents=False)
    _check_adapters(args.adapter)
    pipe = _load(args)
    if getattr(pipe.unet.config, "addition_embed_type", None) == "text_time":
        raise UsageError("the attack optimises one text encoder's prefix: it runs on SD 1.x/2.x models, not SDXL; "
                         "pass another --model")
    pipe.set_progress_bar_config(disable=True)
    for path, scale in args.adapter:
        pipe.load_erasure(path, scale=scale)
    config = AttackConfig(prefix_tokens=args.prefix_tokens, steps=args.attack_steps, seed=args.seed,
                          num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    result = attack(pipe, args.concept, n=args.n, config=config,
                    progress=lambda done, total: print(f"attacked {done}/{total} prompts", file=sys.stderr))
    summary = result.summary()
    if args.report:
        _save_json(summary, Path(args.report))
    print(f"{args.concept}: attack success rate {result.success_rate:.1%} over {len(result.attacks)} prompts "
          f"(present without attack: {result.presence_before:.1%})")
    return 0


def _attack_suite(args: argparse.Namespace) -> int:
    from .attack import AttackConfig, attack_suite
    from .suite_eval import EvaluationSettingsError, weights_sha256

    if args.n != 16:
        raise UsageError("--n does not go with --suite (the file gives the prompts; --limit N takes its first N rows)")
    protocol, suite, main, judge, guidance = _suite_setup(args, "attack")
    if judge.present is None:
        raise UsageError(f"--judge {args.judge or 'toy'} cannot say whether the concept is back: give --concept (the "
                         "toy and clip judges look for it), or use --judge nudenet")
    out = Path(args.out or f"attack-{suite.name}")
    _check_output(str(out), "--out", folder=True)
    if args.report:
        _check_output(args.report, "--report", create_parents=False)
    _check_adapters(args.adapter)
    pipe = _load(args)
    if getattr(pipe.unet.config, "addition_embed_type", None) == "text_time":
        raise UsageError("the attack optimises one text encoder's prefix: it runs on SD 1.x/2.x models, not SDXL; "
                         "pass another --model")
    _set_scheduler(pipe, args.scheduler)
    _check_steps(pipe, args.steps)
    pipe.set_progress_bar_config(disable=True)
    model_sha256 = weights_sha256(pipe)  # the base model, before any adapter
    for path, scale in args.adapter:
        pipe.load_erasure(path, scale=scale)
    config = AttackConfig(prefix_tokens=args.prefix_tokens, steps=args.attack_steps, seed=args.seed,
                          num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    try:
        report = attack_suite(pipe, suite, judge, out, config=config, height=args.height, width=args.width,
                              batch_size=args.batch_size, model=args.model, model_sha256=model_sha256,
                              adapters=args.adapter, protocol=protocol, guidance=guidance,
                              progress=(lambda done, total: print(f"attacked {done}/{total} rows", file=sys.stderr))
                              if main else None)
    except EvaluationSettingsError as error:
        if not main:  # the main process says it
            return 2
        raise UsageError(f"--out: {error}") from None
    except ValueError as error:
        raise UsageError(f"--judge {args.judge or 'toy'}: {error}") from None
    if not main:  # the main process prints and writes the figures
        return 0
    figures = report.summary["figures"]
    _print_made(report)
    for label, values in [("all", figures["all"]), *figures.get("by_category", {}).items()]:
        print(f"{label}: attack success rate {values['success_rate']:.1%} over {values['n']} rows (present without "
              f"attack: {values['presence_before_attack']:.1%})")
    print(f"report: {out / 'summary.json'} (results.jsonl, images/)")
    if args.report:
        _save_json(report.summary, Path(args.report))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _check_output(args.workdir, "--workdir", folder=True)
    try:
        from .apps import demo
    except ImportError as error:
        raise UsageError(f"the demo needs gradio ({error}); install it with: pip install 'unsee[app]'") from None
    return demo.run(args)


def cmd_export(args: argparse.Namespace) -> int:
    from .adapter_export import export_adapter

    if not Path(args.adapter).expanduser().is_file():
        raise UsageError(f"ADAPTER {args.adapter}: no such file; give an adapter .safetensors file")
    checkpoint = args.format == "checkpoint"
    if checkpoint and args.model is None:
        raise UsageError("--format checkpoint merges the adapter into a base model: pass --model MODEL")
    model_options = [flag for flag in ("model", "config", "dtype", "device") if getattr(args, flag) is not None]
    if model_options and not checkpoint:
        raise UsageError(f"--{model_options[0]} is for --format checkpoint; --format {args.format} writes the adapter "
                         "alone: leave it out")
    if args.format == "peft":
        _check_output(args.out, "--out", folder=True)
    else:
        _check_output(args.out, "--out")
    if checkpoint:  # everything is checked before the model is loaded
        from .convert import checkpoint_layout, export_checkpoint

        out, model = Path(args.out).expanduser(), Path(args.model).expanduser()
        lora_flags = [f for f, v in (("--rank", args.rank), ("--drop-other", args.drop_other or None),
                                     ("--sdxl/--no-sdxl", args.sdxl)) if v is not None]
        if lora_flags:
            raise UsageError(f"{lora_flags[0]} shapes LoRA exports; --format checkpoint merges the adapter as it is: "
                             "leave it out")
        if out.suffix != ".safetensors":
            raise UsageError(f"--out {args.out}: the checkpoint format writes a .safetensors file; name it so")
        if out.exists() and not args.overwrite:
            raise UsageError(f"--out {args.out} exists; pass --overwrite to replace it")
        for what, path in (("the base model", model), ("ADAPTER", Path(args.adapter).expanduser())):
            if out.exists() and path.is_file() and out.resolve() == path.resolve():
                raise UsageError(f"--out {args.out} is {what}; write the checkpoint to another path")
        args.device = args.device or "cpu"
        pipe = _load(args)
        export_checkpoint(Path(args.adapter).expanduser(), pipe, out, overwrite=args.overwrite)
        print(f"wrote {out} (checkpoint, {checkpoint_layout(pipe)} layout: {args.model} with {args.adapter} merged)")
        return 0
    result = export_adapter(Path(args.adapter).expanduser(), args.format, Path(args.out).expanduser(), rank=args.rank,
                            drop_other=args.drop_other, overwrite=args.overwrite, sdxl=args.sdxl)
    for line in result.lines():
        print(line)
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    from .adapters import AdapterError, open_adapter_file
    from .fuse import fuse_adapters

    if len(args.adapters) < 2:
        raise UsageError("give at least two ADAPTER files to fuse")
    paths = [Path(p).expanduser() for p in args.adapters]
    for given, path in zip(args.adapters, paths):
        if not path.is_file():
            raise UsageError(f"ADAPTER {given}: no such file; give adapter .safetensors files")
    out = Path(args.out).expanduser()
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {args.out}: adapter files end in .safetensors; name it *.safetensors")
    _check_output(args.out, "--out")
    if any(out.resolve() == path.resolve() for path in paths):
        raise UsageError(f"--out {args.out} is one of the adapters being fused; write the fused adapter to another file")
    if out.exists() and not args.overwrite:
        raise UsageError(f"--out {args.out} exists; pass --overwrite to replace it")
    model_flags = [flag for flag in ("model", "preserve", "template", "lamb", "preserve_scale", "steps", "lr")
                   if getattr(args, flag) is not None]
    options = {}
    if args.method == "stack" and model_flags:
        raise UsageError(f"--{model_flags[0].replace('_', '-')} is for --method mace or distill; --method stack needs "
                         f"no model")
    mace_only = next((flag for flag in ("lamb", "preserve_scale") if getattr(args, flag) is not None), None)
    if args.method == "distill" and mace_only:
        raise UsageError(f"--{mace_only.replace('_', '-')} is for --method mace; leave it out with --method distill")
    distill_only = next((flag for flag in ("steps", "lr") if getattr(args, flag) is not None), None)
    if args.method == "mace" and distill_only:
        raise UsageError(f"--{distill_only} is for --method distill; MACE's fusion is closed-form")
    if args.method in ("mace", "distill"):
        from .adapters import TEXT_ENCODERS, component_fingerprint, template_without_concept
        from .jobs import distill_options, mace_options

        problem = template_without_concept(args.template or (), label="--template")
        if problem is not None:
            raise UsageError(problem)
        try:  # the concepts the preset gives prompts for: from the headers (fuse_adapters reads the tensors)
            headers = []
            for path in paths:
                with open_adapter_file(path) as opened:
                    headers.append(opened.header)
        except AdapterError as error:
            raise UsageError(str(error)) from None
        concepts = list(dict.fromkeys(c for header in headers for c in header.concepts))
        if args.method == "distill":  # before the model is loaded: every adapter a text-encoder one
            unet = next((path for path, header in zip(paths, headers)
                         if any(component not in TEXT_ENCODERS for component in header.components)), None)
            if unet is not None:
                raise UsageError(f"ADAPTER {unet} changes the UNet; --method distill fuses text-encoder adapters "
                                 f"(AdvUnlearn's): fuse UNet adapters with --method stack, or mace for "
                                 f"cross-attention key/value adapters")
        args.model, args.config, args.dtype, args.device = args.model or "toy", None, None, "cpu"
        pipe = _load(args)  # distill: each adapter is matched against the model before any training
        if args.method == "mace":
            options = mace_options(pipe, args.model, concepts, templates=args.template, preserve=args.preserve,
                                   lamb=args.lamb, preserve_scale=args.preserve_scale)
        else:
            from .erasure import ConfigError
            from .erasure.distill import DistillConfig

            given = {flag: getattr(args, flag) for flag in ("steps", "lr") if getattr(args, flag) is not None}
            try:
                config = DistillConfig(**given)
            except ConfigError as error:
                raise UsageError(f"--{str(error)}") from None
            options = distill_options(pipe, args.model, concepts, templates=args.template, preserve=args.preserve,
                                      config=config, progress=True)
    from .erasure import TrainingError

    try:
        fused = fuse_adapters(paths, method=args.method, **options)
        if args.method == "mace" and fused.fingerprint.get("unet") not in ("unknown", component_fingerprint(pipe.unet)):
            raise UsageError(f"the adapters are not for --model {args.model} (their UNet fingerprint differs); pass the "
                             f"model they were trained on")
        fused.save(out)
    except (AdapterError, TrainingError) as error:
        raise UsageError(str(error)) from None
    rank = f", rank {fused.rank}" if fused.rank is not None else ""
    print(f"fused {len(paths)} adapters into {out} ({fused.kind}{rank}, {len(fused.tensors)} tensors; concepts: "
          f"{', '.join(fused.concepts)})")
    return 0


COMMANDS = {"generate": cmd_generate, "eval": cmd_eval, "erase": cmd_erase, "attack": cmd_attack, "demo": cmd_demo,
            "export": cmd_export}
COMMANDS["fuse"] = cmd_fuse


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # bad input (printed on one line), --help or --version: the status, as for the rest
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    from .adapters import AdapterError
    from .guidance import GuidanceError
    from .loading import ModelLoadError

    # a SIGTERM (kill, a job scheduler) ends the command through its error handling, so that the temporary files of
    # a write in progress are removed (only a SIGKILL leaves one, which the next write in that folder removes)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        return COMMANDS[args.command](args)
    except (UsageError, AdapterError, ModelLoadError, GuidanceError) as error:
        print(f"unsee {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unsee {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"unsee {args.command}: error: out of memory; ask for fewer or smaller images, or fewer steps",
              file=sys.stderr)
        return 1
    except Exception as error:
        import torch

        out_of_memory = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
        if isinstance(error, out_of_memory):
            print(f"unsee {args.command}: error: out of memory on the device ({str(error).splitlines()[0][:120]}); ask "
                  "for fewer or smaller images, or use --dtype float16", file=sys.stderr)
            return 1
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
