"""The ``unsee`` command line.

    unsee generate --prompt "a red circle on a gray background" --out out/
    unsee erase --method esd-u --concept circle --steps 200 --out esd-u-circle.safetensors
    unsee erase --config jobs.yaml
    unsee attack --adapter esd-u-circle.safetensors --concept circle
    unsee demo
    unsee --version
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import __version__

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "bfloat16": "bfloat16",
          "bf16": "bfloat16"}


class UsageError(Exception):
    """Bad command-line input; printed without a traceback."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _adapter_spec(text: str) -> tuple[str, float]:
    """FILE or FILE:SCALE."""
    path, _, scale = text.rpartition(":") if re.search(r":-?[0-9.]+$", text) else (text, "", "1")
    try:
        return path, float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"adapter must be FILE or FILE:SCALE, got {text!r}") from None


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="toy",
                        help="'toy' (embedded default), a hub id, a local diffusers folder or a single-file checkpoint")
    parser.add_argument("--config", default=None, help="for a single-file model: a local diffusers folder to take configs from")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights precision (default: as stored)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps... (default: cuda if available, else cpu)")


def _float_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 10,5, got {text!r}") from None
    return values


def _start(text: str):
    """A fraction (0.3) or a step index (an integer such as 5)."""
    try:
        return int(text) if text.isdigit() else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.3 or a step such as 5, got {text!r}") from None


def _add_guidance_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("guidance (combine freely; see unsee.guidance)")
    group.add_argument("--cfgpp", type=float, metavar="LAMBDA", help="CFG++ with this lambda in [0, 1] (replaces CFG)")
    group.add_argument("--pag", type=float, metavar="SCALE", help="perturbed-attention guidance scale")
    group.add_argument("--pag-layers", default="mid", help="comma-separated PAG layers (default: mid)")
    group.add_argument("--fdg", type=_float_list, metavar="HIGH,...,LOW", help="frequency-decoupled guidance scales per band")
    group.add_argument("--negative-start", type=_start, metavar="START",
                       help="delay the negative prompt: fraction of the steps (0.3) or step index (5); "
                            "default 0.2 in fixed mode, 0 in dng mode, not with adaptive")
    group.add_argument("--negative-mode", choices=("fixed", "adaptive", "dng"), default=None,
                       help="negative steering mode: fixed start, adaptive (start detected per image), or dng "
                            "(Dynamic Negative Guidance); default fixed when --negative-start is given")
    group.add_argument("--nasa", type=float, metavar="ALPHA", help="NASA: subtract the negative prompt inside cross-attention")


def guidance_from_args(args: argparse.Namespace) -> list:
    """The guidance objects the CLI flags ask for."""
    from .guidance import FDG, NASA, PAG, CFGpp, NegativeSteer

    methods: list = []
    if args.cfgpp is not None:
        methods.append(CFGpp(args.cfgpp))
    if args.fdg is not None:
        methods.append(FDG(args.fdg))
    if args.pag is not None:
        methods.append(PAG(args.pag, layers=tuple(args.pag_layers.split(","))))
    if args.negative_start is not None or args.negative_mode is not None:
        methods.append(NegativeSteer(start=args.negative_start, mode=args.negative_mode or "fixed"))
    if args.nasa is not None:
        methods.append(NASA(args.nasa))
    return methods


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unsee", description="Concept erasure and guidance for diffusers text-to-image pipelines."
    )
    parser.add_argument("--version", action="version", version=f"unsee {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate images from prompts", description="Generate images; writes PNGs and settings.json.")
    gen.add_argument("--prompt", action="append", required=True, help="text prompt (repeat for several)")
    gen.add_argument("--negative", default=None, help="negative prompt")
    gen.add_argument("--out", required=True, help="output folder (created if missing)")
    gen.add_argument("--steps", type=_positive_int, default=25, help="denoising steps (default 25)")
    gen.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    gen.add_argument("--num-images", type=_positive_int, default=1, help="images per prompt")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--height", type=_positive_int, default=None)
    gen.add_argument("--width", type=_positive_int, default=None)
    gen.add_argument("--adapter", type=_adapter_spec, action="append", default=[], metavar="FILE[:SCALE]",
                     help="erasure adapter to apply (repeat to stack several)")
    _add_guidance_options(gen)
    _add_model_options(gen)

    ev = sub.add_parser("eval", help="score generated images with the judge",
                        description="Generate images and score them with the toy world's judge. With --concept only: the "
                                    "concept's presence on prompts that name it, and the judge's accuracy on prompts that don't.")
    ev.add_argument("--concept", default=None, help="concept word, e.g. circle, red, striped")
    ev.add_argument("--prompt", action="append", default=None, help="prompt(s) to score instead of the concept's prompt sets")
    ev.add_argument("--n", type=_positive_int, default=32, help="images per prompt set (default 32)")
    ev.add_argument("--steps", type=_positive_int, default=25)
    ev.add_argument("--guidance-scale", type=float, default=5.0)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--adapter", type=_adapter_spec, action="append", default=[], metavar="FILE[:SCALE]")
    ev.add_argument("--json", default=None, help="also write the figures to this JSON file")
    _add_model_options(ev)

    er = sub.add_parser("erase", help="train an erasure adapter (ESD, SalUn, SPM, AdvUnlearn)",
                        description="Erase a concept: train an adapter, write it and a JSON report next to it (settings, "
                                    "losses, time). --config FILE runs several jobs (concepts x methods) from a YAML or "
                                    "JSON file with one combined report; every flag below has a key there "
                                    "(see unsee.erasure.jobs).")
    er.add_argument("--method", default=None, metavar="METHOD", help="esd-u, esd-x, esd-all, esd-x-strict, salun, spm, advunlearn or ant")
    er.add_argument("--concept", default=None, help="the concept to erase, e.g. circle, red, striped")
    er.add_argument("--erase-from", default=None, metavar="PROMPT",
                    help="ESD, SPM, AdvUnlearn, ANT: erase the concept only from this prompt (a job file takes a list)")
    er.add_argument("--preset", default=None, choices=("toy", "paper"),
                    help="starting settings (default: toy for the toy model, paper otherwise); flags override them")
    er.add_argument("--steps", type=_positive_int, default=None, help="training steps (default: from the preset)")
    er.add_argument("--lr", type=float, default=None, help="learning rate (default: the paper's)")
    er.add_argument("--eta", type=float, default=None, help="ESD negative guidance (default 1)")
    er.add_argument("--seed", type=int, default=None)
    er.add_argument("--kind", default=None, metavar="KIND", help="ESD or ANT output: delta (default) or lora")
    er.add_argument("--rank", type=_positive_int, default=None, help="LoRA rank (with --kind lora)")
    er.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any other setting of the method's config, e.g. ddim_steps=10 (repeat for several)")
    er.add_argument("--out", default=None, help="adapter file (default ./<method>-<concept>.safetensors)")
    er.add_argument("--report", default=None, help="JSON report (default: the adapter's name with .json)")
    er.add_argument("--grid", type=int, default=None, metavar="N",
                    help="prompts in the before/after image grid <out>.grid.png (default 4, 0: no grid)")
    er.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                    help="checkpoint folder (default <out>.ckpt, removed after success)")
    er.add_argument("--checkpoint-every", type=int, default=None, metavar="N", help="checkpoint every N steps (default 100)")
    er.add_argument("--resume", action="store_true", default=None, help="continue from the checkpoint")
    er.add_argument("--config", default=None, metavar="FILE", help="YAML/JSON file of erasure jobs")
    er.add_argument("--model", default=None,
                    help="'toy' (embedded default), a hub id, a local diffusers folder or a single-file checkpoint")
    er.add_argument("--model-config", default=None, metavar="DIR",
                    help="for a single-file model: a local diffusers folder to take configs from")
    er.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="training precision (default: as stored)")
    er.add_argument("--device", default=None, help="cpu, cuda... (default: what accelerate picks)")

    at = sub.add_parser("attack", help="attack an erasure with adversarial prompts (UnlearnDiffAtk-style)",
                        description="Optimise adversarial prefix tokens that make the erased model regenerate the "
                                    "concept; prints the attack success rate judged by the toy judge.")
    at.add_argument("--adapter", action="append", required=True, type=_adapter_spec, metavar="FILE[:SCALE]",
                    help="erasure adapter to attack (repeat to stack several)")
    at.add_argument("--concept", required=True, help="the erased concept of the toy world, e.g. circle, red, striped")
    at.add_argument("--n", type=_positive_int, default=16, help="prompts naming the concept (default 16)")
    at.add_argument("--prefix-tokens", type=_positive_int, default=5, help="adversarial tokens k (default 5)")
    at.add_argument("--attack-steps", type=_positive_int, default=40, help="optimisation steps per prompt (default 40)")
    at.add_argument("--seed", type=int, default=0)
    at.add_argument("--report", default=None, help="also write the result as JSON here")
    _add_model_options(at)

    demo = sub.add_parser("demo", help="launch the Gradio demo (erase, generate, compare guidance)",
                          description="Launch the Gradio demo on this machine (needs the 'app' extra: gradio).")
    add_demo_arguments(demo)
    return parser


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``unsee demo`` and ``python -m unsee.apps.demo``."""
    parser.add_argument("--model", default="toy",
                        help="'toy' (embedded default), a hub id, a local diffusers folder or a single-file checkpoint")
    parser.add_argument("--workdir", default="unsee-demo", help="where adapters are saved (default ./unsee-demo)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or "prompt"


def _default_device(device: Optional[str]) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _load(args: argparse.Namespace):
    import torch

    from .loading import load_pipeline

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    pipe = load_pipeline(args.model, dtype=dtype, device=_default_device(args.device), config=args.config)
    return pipe


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    if any(not p.strip() for p in args.prompt):
        raise UsageError("--prompt must not be empty")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    from .guidance import GuidanceError, validate_combination

    guidance = guidance_from_args(args)
    try:
        validate_combination(guidance, has_negative_prompt=args.negative is not None)
    except GuidanceError as error:
        raise UsageError(str(error)) from None
    pipe = _load(args)
    for path, scale in args.adapter:
        pipe.load_erasure(path, scale=scale)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    files = []
    for p_index, prompt in enumerate(args.prompt):
        images = pipe(
            prompt, negative_prompt=args.negative, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
            num_images_per_prompt=args.num_images, generator=generator, height=args.height, width=args.width,
            guidance=guidance,  # an empty list is plain diffusers
        ).images
        for i, image in enumerate(images):
            name = f"{p_index:02d}-{i:02d}-{_slug(prompt)}.png"
            tmp = out / f".{name}.tmp"
            image.save(tmp, format="PNG")
            os.replace(tmp, out / name)
            files.append({"file": name, "prompt": prompt, "index": i})
    settings = {
        "unsee_version": __version__, "model": args.model, "prompts": args.prompt, "negative_prompt": args.negative,
        "steps": args.steps, "guidance_scale": args.guidance_scale, "num_images": args.num_images, "seed": args.seed,
        "height": args.height, "width": args.width, "dtype": args.dtype, "device": str(pipe.device),
        "scheduler": type(pipe.scheduler).__name__,
        "adapters": [{"file": str(p), "scale": s} for p, s in args.adapter],
        "guidance": [{"method": type(m).__name__, **dataclasses.asdict(m)} for m in guidance], "images": files,
    }
    tmp = out / ".settings.json.tmp"
    tmp.write_text(json.dumps(settings, indent=2))
    os.replace(tmp, out / "settings.json")
    print(f"wrote {len(files)} image(s) and settings.json to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from . import world
    from .evaluation import evaluate, evaluate_erasure

    if args.concept is None and not args.prompt:
        raise UsageError("pass --concept, --prompt, or both")
    if args.concept is not None:
        try:
            world.concept_attribute(args.concept)
        except ValueError as error:
            raise UsageError(str(error)) from None
    if args.prompt and any(not p.strip() for p in args.prompt):
        raise UsageError("--prompt must not be empty")
    pipe = _load(args)
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
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


def _format_accuracy(accuracy: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.1%}" for name, value in accuracy.items())


# erase flags -> jobs-config keys (unsee.erasure.jobs); --config and --set are handled apart
_ERASE_KEYS = ("method", "concept", "erase_from", "preset", "steps", "lr", "eta", "seed", "kind", "rank", "out", "report", "grid",
               "checkpoint_dir", "checkpoint_every", "resume", "model", "model_config", "dtype", "device")


def _erase_config(args: argparse.Namespace) -> dict:
    """The jobs config the erase flags describe (a file's contents with --config)."""
    from .erasure import METHODS, ConfigError, load_job_file

    if args.config is not None:
        given = [f"--{key.replace('_', '-')}" for key in _ERASE_KEYS if key != "resume" and getattr(args, key) is not None]
        if args.set:
            given.append("--set")
        if given:
            raise UsageError(f"--config FILE takes its settings from the file; put {', '.join(given)} there instead")
        try:
            config = load_job_file(args.config)
        except ConfigError as error:
            raise UsageError(str(error)) from None
        if args.resume:
            config["resume"] = True
        return config
    if args.method is None or args.concept is None:
        raise UsageError(f"pass --method ({', '.join(METHODS)}) and --concept, or --config FILE")
    config = {key: getattr(args, key) for key in _ERASE_KEYS if getattr(args, key) is not None}
    if config.get("dtype") is not None:
        config["dtype"] = DTYPES[config["dtype"]]
    import yaml

    for item in args.set:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--set takes KEY=VALUE, got {item!r}")
        if key in config:
            raise UsageError(f"{key} is given twice (a flag and --set)")
        try:
            config[key] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            config[key] = text
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
    from .erasure import ConfigError, TrainingError, plan_jobs, run_jobs

    config = _erase_config(args)
    try:
        jobs, report_path = plan_jobs(config)  # validates everything before the model is loaded
    except ConfigError as error:
        raise UsageError(str(error)) from None
    progress, close = _erase_progress()
    try:
        report = run_jobs(config, progress=progress, log=lambda message: print(message, file=sys.stderr))
    except ConfigError as error:  # e.g. --resume from a checkpoint written with other settings
        close()
        raise UsageError(str(error)) from None
    except TrainingError as error:
        close()
        print(f"unsee erase: error: {error}", file=sys.stderr)
        return 1
    close()
    for entry in report["jobs"]:
        print(f"{entry['method']} {entry['concept']!r}: wrote {entry['out']} ({entry['tensors']} tensors, loss "
              f"{entry['loss_first']:.4g} -> {entry['loss_last']:.4g}, {entry['seconds']:.1f} s)")
    print(f"report: {report_path}")
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from .attack import AttackConfig, attack
    from . import world

    try:
        world.concept_attribute(args.concept)
    except ValueError as error:
        raise UsageError(str(error)) from None
    pipe = _load(args)
    pipe.set_progress_bar_config(disable=True)
    for path, scale in args.adapter:
        pipe.load_erasure(path, scale=scale)
    config = AttackConfig(prefix_tokens=args.prefix_tokens, steps=args.attack_steps, seed=args.seed)
    result = attack(pipe, args.concept, n=args.n, config=config,
                    progress=lambda done, total: print(f"attacked {done}/{total} prompts", file=sys.stderr))
    summary = result.summary()
    if args.report:
        Path(args.report).write_text(json.dumps(summary, indent=2))
    print(f"{args.concept}: attack success rate {result.success_rate:.1%} over {len(result.attacks)} prompts "
          f"(present without attack: {result.presence_before:.1%})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from .apps import demo
    except ImportError as error:
        raise UsageError(f"the demo needs gradio ({error}); install it with: pip install 'unsee[app]'") from None
    return demo.run(args)


COMMANDS = {"generate": cmd_generate, "eval": cmd_eval, "erase": cmd_erase, "attack": cmd_attack, "demo": cmd_demo}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .adapters import AdapterError
    from .guidance import GuidanceError
    from .loading import ModelLoadError

    try:
        return COMMANDS[args.command](args)
    except (UsageError, AdapterError, ModelLoadError, GuidanceError) as error:
        print(f"unsee {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
