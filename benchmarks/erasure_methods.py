#!/usr/bin/env python
"""Every erasure method on the same concepts of the embedded toy model, attacked; writes its BENCHMARKS.md section.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/erasure_methods.py [--n 64] [--attack-n 16] [--concepts circle]
        [--trajectory-reuse K]

For each concept and each of ESD-u, ESD-x, SalUn, SPM, ANT and AdvUnlearn: train with the toy preset
(``unsee.toy.preset_settings("toy", ...)``) and time it; then, with the adapter loaded, measure the concept's
presence on ``n`` prompts that name it, the judge's accuracy on ``n`` prompts that do not, the other attributes
on the prompts that name it (ANT's bar: the background), and the attack success rate of ``unsee attack``
(UnlearnDiffAtk-style, ``attack-n`` prompts, 5 prefix tokens, 40 steps). Bars (issue 5): presence <= 15% for
every method; AdvUnlearn's attack success rate at most half of ESD-u's; SPM's accuracy drop <= 2 points with an
adapter under 1% of the UNet's size; ANT keeps the background right in >= 90% of the prompts naming the concept.
``--trajectory-reuse K`` trains the methods that sample x_t with DDIM (ESD, SPM, ANT, AdvUnlearn) with
``trajectory_reuse=K`` (it shows in the settings line); ``benchmarks/trajectory_reuse.py`` compares the two.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import hardware, write_section  # noqa: E402
from erasure_efficacy import EVAL_SEED, erase_and_measure, figures, world_prompts_text  # noqa: E402

import unsee  # noqa: E402
from unsee.attack import AttackConfig  # noqa: E402
from unsee.erasure import METHODS as TRAINERS  # noqa: E402
from unsee.erasure.registry import config_fields  # noqa: E402
from unsee.toy.evaluation import attack  # noqa: E402
from unsee.toy.judge import Judge  # noqa: E402

METHODS = ("esd-u", "esd-x", "salun", "spm", "ant", "advunlearn")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=64, help="images per prompt set")
    parser.add_argument("--attack-n", type=int, default=16, help="prompts attacked per row")
    parser.add_argument("--concepts", default="circle", help="comma-separated concepts of the toy world")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--trajectory-reuse", type=int, default=1,
                        help="trajectory_reuse of the methods that have it (1: their default)")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    parser.add_argument("--log", type=Path, default=None,
                        help="append each finished row here (JSON lines); rows already in it are not run again")
    args = parser.parse_args()
    pipe = unsee.load_pipeline("toy")
    pipe.set_progress_bar_config(disable=True)
    judge = Judge.load().predict
    unet_bytes = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())

    done = [json.loads(line) for line in args.log.read_text().splitlines()] if args.log and args.log.exists() else []
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for concept in args.concepts.split(","):
            before = None
            for method in args.methods.split(","):
                overrides = ({"trajectory_reuse": args.trajectory_reuse} if args.trajectory_reuse != 1
                             and "trajectory_reuse" in config_fields(TRAINERS[method].config) else {})
                logged = [r for r in done if (r["concept"], r["method"], r["n"]) == (concept, method, args.n)
                          and r["settings"].get("trajectory_reuse", 1) == overrides.get("trajectory_reuse", 1)]
                if logged:
                    results.append(logged[-1])
                    continue
                before = before or figures(pipe, concept, args.n, judge)
                row, adapter = erase_and_measure(pipe, concept, method, args.n, judge, Path(tmp), overrides)
                name = pipe.load_erasure(row["path"])
                started = time.perf_counter()
                attacked = attack(pipe, concept, n=args.attack_n, config=AttackConfig(seed=EVAL_SEED), judge=judge)
                row["attack_seconds"] = time.perf_counter() - started
                row["adapter_weight_bytes"] = sum(t.numel() * t.element_size() for t in adapter.tensors.values())
                pipe.unload_erasure(name)
                row.update(n=args.n, before=before, attack_success=attacked.success_rate,
                           attack_presence_before=attacked.presence_before,
                           adversarial_prompts=[a.adversarial_prompt for a in attacked.attacks][:4])
                results.append(row)
                print(json.dumps(row, default=float), flush=True)
                if args.log:
                    with open(args.log, "a") as log:
                        log.write(json.dumps(row, default=float) + "\n")

    def drop(r: dict) -> float:
        return 100 * (r["before"]["mean_accuracy"] - r["after"]["mean_accuracy"])

    def bars(r: dict) -> str:
        notes = ["presence ≤ 15%: " + ("yes" if r["after"]["presence"] <= 0.15 else "**no**")]
        if r["method"] == "advunlearn":
            esd_u = [x for x in results if x["method"] == "esd-u" and x["concept"] == r["concept"]]
            if esd_u:
                half = esd_u[0]["attack_success"] / 2
                notes.append(f"ASR ≤ ½ ESD-u's ({half:.1%}): " + ("yes" if r["attack_success"] <= half else "**no**"))
        if r["method"] == "spm":
            notes.append("drop ≤ 2 pts: " + ("yes" if drop(r) <= 2 else "**no**"))
            small = r["adapter_weight_bytes"] < 0.01 * unet_bytes
            notes.append("adapter weights < 1% of UNet's: " + ("yes" if small else "**no**"))
        if r["method"] == "ant" and "background" in r["after"]["named_accuracy"]:
            notes.append("background ≥ 90%: " + ("yes" if r["after"]["named_accuracy"]["background"] >= 0.9 else "**no**"))
        return "; ".join(notes)

    lines = ["| concept | method | presence before → after | accuracy on other prompts (change) "
             "| other attributes on the concept's prompts | attack success rate (without the attack) "
             "| training time | adapter (weights / UNet's) | bars |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        before, after = r["before"], r["after"]
        kept = ", ".join(f"{k} {v:.0%}" for k, v in after["named_accuracy"].items())
        lines.append(
            f"| {r['concept']} | {r['method']} | {before['presence']:.1%} → {after['presence']:.1%} "
            f"| {after['mean_accuracy']:.1%} ({-drop(r):+.1f} pts) | {kept} "
            f"| {r['attack_success']:.1%} ({r['attack_presence_before']:.1%}) "
            f"| {r['seconds']:.0f} s | {r['adapter_bytes'] / 2**20:.2f} MB ({r['adapter_weight_bytes'] / unet_bytes:.2%}) "
            f"| {bars(r)} |")
    def setting_text(value: object) -> object:
        return world_prompts_text(value) if isinstance(value, (list, tuple)) else value

    first = {r["method"]: r["settings"] for r in results if r["concept"] == results[0]["concept"]}
    settings = "; ".join(f"{method}: " + ", ".join(f"{k}={setting_text(v)}" for k, v in values.items())
                         for method, values in first.items())
    differing = []  # later concepts' settings where they differ from the first concept's (TOY_BY_ATTRIBUTE)
    for r in results:
        base = first.get(r["method"], {})
        changed = [f"{k}={setting_text(v)}" for k, v in r["settings"].items()
                   if setting_text(v) != setting_text(base.get(k))]
        if r["concept"] != results[0]["concept"] and changed:
            differing.append(f"{r['concept']} {r['method']}: {', '.join(changed)}")
    if differing:
        settings += ". Settings by attribute (`TOY_BY_ATTRIBUTE`, `TOY_ESD_BY_ATTRIBUTE`): " + "; ".join(differing)
    prefixes = {tuple(r["adversarial_prompts"]) for r in results}
    shown = "; ".join(f"``{json.dumps(p)}``" for p in results[0]["adversarial_prompts"])
    examples = (f"The same in every row: {shown}" if len(prefixes) == 1 else "\n".join(
        f"- {r['method']}: " + "; ".join(f"``{json.dumps(p)}``" for p in r["adversarial_prompts"]) for r in results))
    body = f"""## Erasure methods compared on the toy model (`benchmarks/erasure_methods.py`)

Hardware: {hardware()}.

Presence: share of {args.n} images, from prompts that name the concept, in which the judge sees it. Accuracy: the
judge's mean per-attribute accuracy on {args.n} prompts that do not name it (change: against the original model).
Other attributes: judged on the concept's own prompts. Attack success rate: `unsee attack` (UnlearnDiffAtk-style,
5 prefix tokens, 40 Adam steps) on {args.attack_n} prompts naming the concept; a prompt counts as broken when the
concept is present with the attacked prompt (or already without it). 25 DDIM steps, CFG 5, evaluation seed
{EVAL_SEED}; the UNet's weights are {unet_bytes / 2**20:.2f} MB (adapter: file size, and its weights as a share of
the UNet's; the rest of a file is its safetensors header: tensor names and the training record). Settings, the toy preset (`unsee/toy/presets.py`): {settings}.

{chr(10).join(lines)}

First attacked prompts of each row (JSON strings):

{examples}
"""
    if not args.no_write:
        write_section("erasure-methods", body)
    print(body)


if __name__ == "__main__":
    main()
