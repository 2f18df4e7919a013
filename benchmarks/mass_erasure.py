#!/usr/bin/env python
"""Mass erasure and time-to-erase on the embedded toy model; writes its BENCHMARKS.md section.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/mass_erasure.py [--n 32] [--workdir /tmp/unsee-mass-erasure]
        [--parts time,four,curve] [--four-methods uce,rece,esd-x,spm,esd-x-strict]
        [--curve-methods uce,rece,uce-stacked,esd-x-stacked] [--ks 1,2,4,6,8,11] [--stacked-k 1,2,4,6,8,11]
        [--quick] [--no-write]

Every adapter comes from ``unsee erase ... --grid 0`` (the toy preset, as the CLI applies it) in a fresh process,
timed from the process's start to the adapter written (as ``benchmarks/closed_form.py``), with the CPU time the
process used beside it (on a machine shared with other jobs the wall time grows with the load; the CPU time much
less). Three parts:

- ``time``: time-to-erase of every method (UCE, RECE, ESD-x, ESD-u, SPM, SalUn, ANT, AdvUnlearn) on "circle",
  side by side, with the concept's presence on ``n`` prompts that name it and the judge's accuracy on ``n`` prompts
  that do not (before and after), and each method's time over UCE's. Bar (issue 25) for UCE: presence <= 10%,
  accuracy down <= 3 points, under 10 s.
- ``four``: circle, star, red and striped at once: in one run (UCE, RECE, ESD-x, ESD-u, SPM; ESD and SPM train
  one concept per step, so they get the toy preset's steps x 4), as the four single-concept adapters loaded
  together (every method: :data:`STACKED`; each with its own concept's toy preset) and fused into one file (``unsee
  fuse``: ESD-x's summed, UCE's and ESD-x-strict's with MACE's refit, AdvUnlearn's distilled, :data:`FUSED`). Per
  row each concept's
  presence on its own prompts and the accuracy on prompts naming none of them (``closed_form.unnamed_prompts``).
  Bars: each concept <= 15%, accuracy down <= 5 points.
- ``curve``: k = 1, 2, 4, 6, 8, 11 concepts erased (of :data:`CURVE`: five shapes, five colours and "striped";
  the heart, purple and the backgrounds are kept) against the accuracy on prompts naming none of them, the mean
  presence of the erased ones, and the accuracy on prompts of the kept shape and colour (each background among
  them): UCE and RECE in one solve, UCE and ESD-x as single-concept adapters loaded together (each made once,
  reused across k); ``--curve-methods`` adds others: ESD-x or SPM in one run, ``M-stacked``, and ``M-mace`` (the
  single-concept adapters fused with MACE's refit, e.g. ``esd-x-strict-mace``).

Adapters (with their timings) and every measurement are kept under ``--workdir``, keyed by method, concepts and
steps (measurements also by the adapters loaded, the prompt set and ``n``), so a killed run resumes without
retraining or re-measuring. ``--quick``: n = 4, two concepts, ESD-x and SPM trained for 2 steps per concept, in
its own work folder; it exercises every path in a few minutes and writes nothing to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from closed_form import unnamed_prompts  # noqa: E402
from common import ROOT, hardware, read_section, write_section  # noqa: E402
from erasure_efficacy import EVAL_SEED  # noqa: E402

from unsee.toy import world  # noqa: E402
from unsee.toy.presets import TOY_PRESETS, preset_settings  # noqa: E402

SECTION = "mass-erasure"
TIME_METHODS = ("uce", "rece", "esd-x", "esd-u", "spm", "salun", "ant", "advunlearn")
NATIVE = ("uce", "rece", "esd-x", "esd-u", "spm")  # erase several concepts in one run
STEPPED = ("esd-x", "esd-u", "spm")  # one concept per training step: their steps grow with the concepts
CLOSED_FORM = ("uce", "rece")  # no training steps (--quick shortens every other method's)
# single-concept adapters loaded together
STACKED = ("uce", "esd-x", "esd-x-strict", "esd-u", "spm", "salun", "ant", "advunlearn")
# single-concept adapters fused into one file, and how: the exact sum, MACE's refit of the keys and values, or
# (text-encoder adapters) the distilled text-encoder delta
FUSED = {"uce": "mace", "esd-x": "stack", "esd-x-strict": "mace", "advunlearn": "distill"}
FOUR = ("circle", "star", "red", "striped")
KEPT = {"shape": "heart", "color": "purple"}  # with the backgrounds, what the curve never erases
# the erasable concepts, in the order the curve adds them: the first four are FOUR
CURVE = ("circle", "star", "red", "striped", "square", "orange", "triangle", "yellow", "cross", "green", "blue")
KS = (1, 2, 4, 6, 8, 11)
CURVE_METHODS = ("uce", "rece", "uce-stacked", "esd-x-stacked")
QUICK_STEPS = 2  # --quick: training steps per concept of the trained methods
# bars (issue 25)
TIME_PRESENCE, TIME_DROP, TIME_SECONDS = 0.10, 3.0, 10.0
MANY_PRESENCE, MANY_DROP = 0.15, 5.0
ATTEMPTS = 5  # tries of a CLI run that fails at once (the tree edited meanwhile), 90 s apart
EPS = 1e-9  # shares of n images and their differences in points, compared with the bars
KEPT_BAR = 0.90  # "still recognisable": the judge gets the kept shape, colour and background right this often
# each part's subsection, by its title (a run that writes some parts keeps the others' as BENCHMARKS.md has them)
PART_TITLES = {"time": re.compile(r"^### Time to erase"), "four": re.compile(r"^### \d+ concepts at once"),
               "curve": re.compile(r"^### Concepts erased against")}


def adapter_key(method: str, concepts: tuple[str, ...], steps: Optional[int] = None) -> str:
    """The cache name of ``method``'s adapter for ``concepts`` (in order) trained for ``steps`` (None: the preset)."""
    return f"{method}-{'+'.join(concepts)}" + (f"-steps{steps}" if steps else "")


def stale_setting(method: str, concepts: tuple[str, ...], steps: Optional[int], report: Path) -> Optional[str]:
    """The first setting in which a cached adapter's run (its ``unsee erase`` report) differs from what the toy
    preset gives that run now (None: none, or no report to tell): a cached adapter made before a preset changed is
    made again."""
    if not report.exists():
        return None
    more = {"concepts": list(concepts[1:])} if len(concepts) > 1 else {}
    if steps:
        more["steps"] = steps
    wanted = preset_settings("toy", method, concept=concepts[0], settings=more)
    had = json.loads(report.read_text())["jobs"][0].get("settings") or {}

    def plain(value):
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    return next((k for k, v in wanted.items() if k in had and plain(had[k]) != plain(v)), None)


def set_name(kind: str, concepts: tuple[str, ...] = ()) -> str:
    """A prompt set's cache name: ``named``/``other`` (one concept), ``none`` (several, order-free) or ``kept``."""
    return f"{kind}:{'+'.join(sorted(concepts) if kind == 'none' else concepts)}"


def prompt_set(name: str, n: int) -> tuple[list[str], Optional[str]]:
    """The ``n`` prompts of a set and the concept whose presence is read (None: accuracy only).

    - ``named:c``: world prompts naming c (presence of c); ``other:c``: prompts naming the other values of c's
      attribute (the single-concept sections' "accuracy on other prompts");
    - ``none:a+b+...``: prompts (shape, colour, background) naming none of them (``closed_form.unnamed_prompts``);
    - ``kept:``: prompts of the kept shape and colour, each on a random background.
    """
    kind, _, rest = name.partition(":")
    concepts = tuple(c for c in rest.split("+") if c)
    if kind == "named":
        return world.concept_prompts(concepts[0], EVAL_SEED, n), concepts[0]
    if kind == "other":
        return world.other_prompts(concepts[0], EVAL_SEED, n), concepts[0]
    if kind == "none":
        return unnamed_prompts(concepts, n), None
    if kind == "kept":
        return world.attribute_prompts(EVAL_SEED, n, **KEPT), None
    raise ValueError(f"unknown prompt set {name!r}")


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def shown_settings(settings: dict) -> str:
    """A job's settings in a line: prompt lists by their length."""
    def text(value):
        if isinstance(value, (list, tuple)):
            return f"{len(value)} world prompts" if all(isinstance(v, str) for v in value) and len(value) > 4 else value
        return value
    skip = ("concepts", "checkpoint_dir", "checkpoint_every", "device", "dtype")
    return ", ".join(f"{k}={text(v)}" for k, v in settings.items() if k not in skip and v is not None)


class Bench:
    """Runs ``unsee erase``/``unsee fuse`` and measurements, each once: results live in ``workdir``."""

    def __init__(self, workdir: Path, n: int, quick: bool):
        self.workdir, self.n, self.quick = workdir, n, quick
        self.adapters = workdir / "adapters"
        self.adapters.mkdir(parents=True, exist_ok=True)
        self.log = workdir / f"measurements-n{n}.jsonl"
        self.cache: dict[str, dict] = {}
        if self.log.exists():
            for line in self.log.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.cache[row["key"]] = row
        self.pipe = self.judge = None
        self.failures: list[str] = []

    # ------------------------------------------------------------------------------------------ processes

    def _run(self, command: list[str], log: Path) -> tuple[int, float, float, float]:
        """Run a CLI command in a fresh process: (return code, wall seconds, CPU seconds, 1-minute load before).
        A run that fails within a minute (an import error while the tree is being edited) is tried again, up to
        :data:`ATTEMPTS` times, 90 s apart; the figures are the last attempt's."""
        for attempt in range(ATTEMPTS):
            code, wall, cpu, load = self._run_once(command, log)
            if code == 0 or wall > 60 or attempt == ATTEMPTS - 1:
                return code, wall, cpu, load
            print(f"  failed after {wall:.0f} s, trying again in 90 s", flush=True)
            time.sleep(90)
        raise AssertionError("unreachable")

    def _run_once(self, command: list[str], log: Path) -> tuple[int, float, float, float]:
        load = os.getloadavg()[0]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        with open(log, "w") as out:
            code = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=out,
                                  stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        return code, wall, cpu, load

    def _fail(self, what: str, log: Path) -> None:
        tail = log.read_text().strip().splitlines()[-1:] if log.exists() else []
        if not any(f.startswith(f"{what}:") for f in self.failures):
            self.failures.append(f"{what}: " + " / ".join(tail))
        print(f"FAILED {what}: {' / '.join(tail)}", flush=True)

    def erase(self, method: str, concepts: tuple[str, ...], steps: Optional[int] = None) -> Optional[dict]:
        """``unsee erase --method method --concept c ... [--steps steps] --grid 0``, timed; cached. None if it
        failed."""
        if self.quick and method not in CLOSED_FORM and steps is None:
            steps = QUICK_STEPS
        key = adapter_key(method, concepts, steps)
        path, timing = self.adapters / f"{key}.safetensors", self.adapters / f"{key}.timing.json"
        report, checkpoints = self.adapters / f"{key}.report.json", self.workdir / "checkpoints" / key
        if path.exists() and timing.exists():
            changed = stale_setting(method, concepts, steps, report)
            if changed is None:
                return {**json.loads(timing.read_text()), "path": str(path)}
            print(f"  {key}: made with another {changed} than the preset gives now: trained again", flush=True)
            self.forget(key)
        shutil.rmtree(checkpoints, ignore_errors=True)  # a killed run's checkpoint: trained again, timed whole
        command = [sys.executable, "-m", "unsee.cli", "erase", "--method", method, "--out", str(path), "--report",
                   str(report), "--grid", "0", "--overwrite", "--checkpoint-dir", str(checkpoints)]
        for concept in concepts:
            command += ["--concept", concept]
        if steps:
            command += ["--steps", str(steps)]
        print(f"erase {key} ...", flush=True)
        code, wall, cpu, load = self._run(command, self.adapters / f"{key}.log")
        if code != 0 or not path.exists():
            self._fail(f"erase {key}", self.adapters / f"{key}.log")
            return None
        jobs = json.loads(report.read_text())["jobs"]
        record = {"key": key, "method": method, "concepts": list(concepts), "steps": steps, "wall": wall, "cpu": cpu,
                  "load": load, "training_seconds": sum(j.get("training_seconds") or 0 for j in jobs),
                  "settings": shown_settings(jobs[0].get("settings") or {})}
        timing.write_text(json.dumps(record))
        print(f"  {key}: {wall:.1f} s wall, {cpu:.1f} s CPU, load {load:.1f}", flush=True)
        return {**record, "path": str(path)}

    def fuse(self, sources: list[Optional[dict]], method: str = "stack") -> Optional[dict]:
        """``unsee fuse --method method`` of the sources' files into one (MACE with the toy model's preset), timed;
        cached. None if a source is missing or it failed."""
        if any(s is None for s in sources):
            return None
        key = ("fused-" if method == "stack" else f"{method}-") + "+".join(s["key"] for s in sources)
        path, timing = self.adapters / f"{key}.safetensors", self.adapters / f"{key}.timing.json"
        if path.exists() and timing.exists():
            if all(Path(s["path"]).stat().st_mtime <= path.stat().st_mtime for s in sources):
                return {**json.loads(timing.read_text()), "path": str(path)}
            print(f"  {key}: a source was made again: fused again", flush=True)
            self.forget(key)
        command = [sys.executable, "-m", "unsee.cli", "fuse", *[s["path"] for s in sources], "--out", str(path),
                   "--overwrite", "--method", method]
        code, wall, cpu, load = self._run(command, self.adapters / f"{key}.log")
        if code != 0 or not path.exists():
            self._fail(f"fuse {key}", self.adapters / f"{key}.log")
            return None
        record = {"key": key, "wall": wall, "cpu": cpu, "load": load}
        timing.write_text(json.dumps(record))
        return {**record, "path": str(path)}

    def forget(self, key: str) -> None:
        """Drop the measurements made with adapter ``key`` loaded (it is being made again); a measurement's tag is
        its adapters' keys joined by "+" (over-matching only measures again)."""
        dropped = [k for k in self.cache if f"+{key}+" in f"+{k.split('|')[0]}+"]
        for k in dropped:
            del self.cache[k]
        if dropped and self.log.exists():
            kept = [line for line in self.log.read_text().splitlines()
                    if line.strip() and json.loads(line)["key"] not in dropped]
            self.log.write_text("".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------------------------------ measuring

    def _load_model(self) -> None:
        if self.pipe is None:
            import unsee
            from unsee.toy.judge import Judge

            self.pipe = unsee.load_pipeline("toy")
            self.pipe.set_progress_bar_config(disable=True)
            self.judge = Judge.load().predict

    def measure(self, adapters: list[Optional[dict]], sets: list[str]) -> Optional[dict[str, dict]]:
        """Each prompt set's figures with ``adapters`` loaded together (``[]``: the original model); cached.
        None when an adapter is missing (its training failed)."""
        if any(a is None for a in adapters):
            return None
        tag = "+".join(a["key"] for a in adapters) or "original"
        keys = {s: f"{tag}|{s}|n{self.n}" for s in sets}
        missing = [s for s in sets if keys[s] not in self.cache]
        if missing:
            from unsee.toy.evaluation import evaluate

            self._load_model()
            for i, adapter in enumerate(adapters):
                self.pipe.load_erasure(adapter["path"], adapter_name=f"mass{i}")
            try:
                for s in missing:
                    prompts, concept = prompt_set(s, self.n)
                    started = time.perf_counter()
                    result = evaluate(self.pipe, prompts, concept=concept, judge=self.judge, n=self.n, seed=EVAL_SEED)
                    row = {"key": keys[s], "presence": result.presence, "accuracy": result.accuracy,
                           "mean_accuracy": mean(result.accuracy.values()), "seconds": time.perf_counter() - started}
                    self.cache[keys[s]] = row
                    with open(self.log, "a") as log:
                        log.write(json.dumps(row) + "\n")
                    print(f"  {keys[s]}: presence {row['presence']}, accuracy {row['mean_accuracy']:.3f}", flush=True)
            finally:
                if adapters:
                    self.pipe.unload_erasure()
        return {s: self.cache[keys[s]] for s in sets}


# ---------------------------------------------------------------------------------------------- the parts


def part_time(bench: Bench, methods: tuple[str, ...]) -> dict:
    before = bench.measure([], [set_name("named", ("circle",)), set_name("other", ("circle",))])
    rows = []
    for method in methods:
        adapter = bench.erase(method, ("circle",))
        after = bench.measure([adapter], [set_name("named", ("circle",)), set_name("other", ("circle",))])
        rows.append({"method": method, "adapter": adapter, "after": after})
    return {"before": before, "rows": rows}


def many_sets(concepts: tuple[str, ...], kept: bool = False) -> list[str]:
    return ([set_name("named", (c,)) for c in concepts] + [set_name("none", concepts)]
            + ([set_name("kept")] if kept else []))


def native_steps(bench: Bench, method: str, k: int) -> Optional[int]:
    if method not in STEPPED:
        return None
    return (QUICK_STEPS if bench.quick else TOY_PRESETS[method]["steps"]) * k


def part_four(bench: Bench, four: tuple[str, ...], methods: tuple[str, ...] = NATIVE + STACKED) -> dict:
    sets = many_sets(four)
    before = bench.measure([], sets)
    rows = []
    for method in (m for m in NATIVE if m in methods):
        adapter = bench.erase(method, four, native_steps(bench, method, len(four)))
        rows.append({"how": "one run", "method": method, "adapters": [adapter],
                     "figures": bench.measure([adapter], sets),
                     "seconds": adapter and adapter["wall"], "cpu": adapter and adapter["cpu"],
                     "steps": adapter and adapter["steps"]})
    for method in (m for m in STACKED if m in methods):
        singles = [bench.erase(method, (c,)) for c in four]
        done = all(singles)
        rows.append({"how": f"{len(four)} adapters loaded together", "method": method, "adapters": singles,
                     "figures": bench.measure(singles, sets), "seconds": done and sum(s["wall"] for s in singles),
                     "cpu": done and sum(s["cpu"] for s in singles)})
        if method in FUSED:
            fused = bench.fuse(singles, FUSED[method])
            rows.append({"how": f"{len(four)} adapters fused (`unsee fuse --method {FUSED[method]}`)",
                         "method": method, "adapters": [fused],
                         "figures": bench.measure([fused], sets),
                         "seconds": fused and done and sum(s["wall"] for s in singles) + fused["wall"],
                         "cpu": fused and done and sum(s["cpu"] for s in singles) + fused["cpu"],
                         "fuse_seconds": fused and fused["wall"]})
    return {"concepts": four, "before": before, "rows": rows}


def part_curve(bench: Bench, concepts: tuple[str, ...], ks: tuple[int, ...], methods: tuple[str, ...],
               stacked_ks: tuple[int, ...]) -> dict:
    before = {k: bench.measure([], many_sets(concepts[:k], kept=True)) for k in ks}
    rows = []
    for method in methods:
        for k in ks:
            erased = concepts[:k]
            base, _, how = method.rpartition("-")
            if how in ("stacked", "mace"):
                if k not in stacked_ks and base not in CLOSED_FORM:
                    continue
                made = [bench.erase(base, (c,)) for c in erased]
                # -mace: the k adapters fused into one with MACE's refit (one adapter needs no fusion)
                adapters = [bench.fuse(made, "mace")] if how == "mace" and k > 1 else made
                made += [a for a in adapters if a not in made]
            else:
                adapters = made = [bench.erase(method, erased, native_steps(bench, method, k))]
            done = all(made)
            rows.append({"method": method, "k": k, "erased": erased, "adapters": adapters,
                         "figures": bench.measure(adapters, many_sets(erased, kept=True)),
                         "seconds": done and sum(a["wall"] for a in made),
                         "cpu": done and sum(a["cpu"] for a in made)})
    return {"concepts": concepts, "before": before, "rows": rows}


# ---------------------------------------------------------------------------------------------- the section


def yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def time_table(part: dict) -> str:
    before = part["before"]
    named, other = set_name("named", ("circle",)), set_name("other", ("circle",))
    uce = next((r["adapter"] for r in part["rows"] if r["method"] == "uce" and r["adapter"]), None)
    lines = ["| method | time: process start → adapter (CPU time; load) | × UCE's | training alone "
             "| presence before → after | accuracy on other prompts before → after (change) "
             "| presence ≤ 10% | drop ≤ 3 pts | bar (UCE): presence ≤ 10%, drop ≤ 3 pts, < 10 s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in part["rows"]:
        a = r["adapter"]
        if a is None or r["after"] is None:
            lines.append(f"| {r['method']} | failed | | | | | | | |")
            continue
        after = r["after"]
        drop = 100 * (before[other]["mean_accuracy"] - after[other]["mean_accuracy"])
        gone, kept = after[named]["presence"] <= TIME_PRESENCE + EPS, drop <= TIME_DROP + EPS
        ratio = f"{a['wall'] / uce['wall']:.1f}×" if uce else ""
        bar = yes(gone and kept and a["wall"] < TIME_SECONDS) if r["method"] == "uce" else ""
        lines.append(
            f"| {r['method']} | {a['wall']:.1f} s ({a['cpu']:.1f} s; {a['load']:.1f}) | {ratio} "
            f"| {a['training_seconds']:.1f} s | {before[named]['presence']:.1%} → {after[named]['presence']:.1%} "
            f"| {before[other]['mean_accuracy']:.1%} → {after[other]['mean_accuracy']:.1%} ({-drop:+.1f} pts) "
            f"| {yes(gone)} | {yes(kept)} | {bar} |")
    return "\n".join(lines)


def four_table(part: dict) -> str:
    four, before = part["concepts"], part["before"]
    none = set_name("none", four)
    base = before[none]["mean_accuracy"]
    lines = ["| method | how | " + " | ".join(f"{c} presence" for c in four)
             + " | accuracy on prompts naming none (change) | time (CPU time) | bars: each ≤ 15%, drop ≤ 5 pts |",
             "|---" * (len(four) + 5) + "|",
             "| (original model) | | " + " | ".join(f"{before[set_name('named', (c,))]['presence']:.1%}" for c in four)
             + f" | {base:.1%} | | |"]
    for r in part["rows"]:
        how = r["how"] + (f", {r['steps']} steps" if r.get("steps") else "")
        if r["figures"] is None:
            lines.append(f"| {r['method']} | {how} | " + " | ".join("" for _ in four) + " | failed | | |")
            continue
        f = r["figures"]
        presence = [f[set_name("named", (c,))]["presence"] for c in four]
        drop = 100 * (base - f[none]["mean_accuracy"])
        met = all(p <= MANY_PRESENCE + EPS for p in presence) and drop <= MANY_DROP + EPS
        lines.append(f"| {r['method']} | {how} | " + " | ".join(f"{p:.1%}" for p in presence)
                     + f" | {f[none]['mean_accuracy']:.1%} ({-drop:+.1f} pts) "
                     f"| {r['seconds']:.0f} s ({r['cpu']:.0f} s) | {yes(met)} |")
    return "\n".join(lines)


def curve_rows(part: dict) -> list[dict]:
    """Each curve row's figures: mean and largest presence of the erased concepts, accuracy on prompts naming none
    of them (and the original's), accuracy per attribute on the kept prompts."""
    out = []
    for r in part["rows"]:
        k, erased, f = r["k"], r["erased"], r["figures"]
        if f is None:
            out.append({**r, "failed": True})
            continue
        none = set_name("none", erased)
        presence = [f[set_name("named", (c,))]["presence"] for c in erased]
        out.append({**r, "failed": False, "mean_presence": mean(presence), "max_presence": max(presence),
                    "accuracy": f[none]["mean_accuracy"], "base": part["before"][k][none]["mean_accuracy"],
                    "kept": f[set_name("kept")]["accuracy"]})
    return out


def curve_table(part: dict) -> str:
    lines = ["| method | k | erased (added at this k) | mean presence of the erased (largest) "
             "| accuracy on prompts naming none (original's) | kept prompts: shape / colour / background "
             "| kept recognisable (each ≥ 90%) | time (CPU time) |", "|---|---|---|---|---|---|---|---|"]
    previous: dict[str, tuple] = {}
    for r in curve_rows(part):
        added = [c for c in r["erased"] if c not in previous.get(r["method"], ())]
        previous[r["method"]] = tuple(r["erased"])
        if r["failed"]:
            lines.append(f"| {r['method']} | {r['k']} | {', '.join(added)} | failed | | | | |")
            continue
        kept = r["kept"]
        recognisable = all(kept.get(a, 0) >= KEPT_BAR - EPS for a in ("shape", "color", "background"))
        lines.append(
            f"| {r['method']} | {r['k']} | {', '.join(added)} | {r['mean_presence']:.1%} ({r['max_presence']:.1%}) "
            f"| {r['accuracy']:.1%} ({r['base']:.1%}) "
            f"| {kept.get('shape', 0):.0%} / {kept.get('color', 0):.0%} / {kept.get('background', 0):.0%} "
            f"| {yes(recognisable)} | {r['seconds']:.0f} s ({r['cpu']:.0f} s) |")
    return "\n".join(lines)


def load_note(adapters: list[dict]) -> str:
    """How loaded the machine was when the adapters' runs started (their wall times grow with it)."""
    loads = [a["load"] for a in adapters]
    if not loads:
        return ""
    return (f"1-minute load average when each `unsee erase` of this part started: {min(loads):.1f} to "
            f"{max(loads):.1f}, mean {mean(loads):.1f}.")


def carried_blocks(missing: list[str]) -> dict[str, str]:
    """The subsections of the parts a run does not write, as BENCHMARKS.md has them (kept as they are)."""
    body = read_section(SECTION) or ""
    body = re.split(r"\n\n(?=Compute behind |Failed runs: )", body)[0]  # a run's footer goes with the run
    blocks = {}
    for block in re.split(r"\n(?=### )", body)[1:]:
        part = next((p for p, title in PART_TITLES.items() if title.search(block.splitlines()[0])), None)
        if part in missing:
            blocks[part] = block.strip()
    return blocks


def section(parts: dict, args, settings: str, bench: Bench) -> str:
    """The section: the parts this run measured, and the others as BENCHMARKS.md has them."""
    stored = sum(a["wall"] for a in _adapters(parts)) + sum(r.get("seconds", 0) for r in bench.cache.values())
    carried = carried_blocks([p for p in PART_TITLES if p not in parts])
    blocks = [f"""## Mass erasure and time-to-erase on the toy model (`benchmarks/mass_erasure.py`)

Hardware: {hardware()}.

Wall times grow with the machine's load (given for each part); the CPU time each process used is given beside its
wall time.

Every adapter comes from `unsee erase --method M --concept ... --grid 0` in a fresh process with the toy preset (as
the CLI applies it to each concept: `unsee/toy/presets.py`), timed from the process's start to the adapter written
(Python start, imports, loading the toy model, training or the solve, writing). Presence: share of {args.n} images,
from world prompts that name the concept, in which the judge sees it. Accuracy: the judge's mean per-attribute
accuracy. {args.n} images per prompt set, 25 DDIM steps, CFG 5, evaluation seed {EVAL_SEED}."""]
    if "time" in parts:
        blocks.append(f"""### Time to erase "circle", every method

{load_note(_adapters({"time": parts["time"]}))}
Accuracy on other prompts: {args.n} prompts naming the other shapes (as in the other erasure sections). × UCE's: the
method's wall time over UCE's; training alone: the trainer's own time from the adapter's report. Settings: {settings}.

{time_table(parts['time'])}""")
    elif "time" in carried:
        blocks.append(carried["time"])
    if "four" in parts:
        four_part = parts["four"]
        four = four_part["concepts"]
        blocks.append(f"""### {len(four)} concepts at once: {', '.join(four)}

{load_note(_adapters({"four": four_part}))}
One run: `unsee erase --method M --concept {' --concept '.join(four)}` (ESD-x, ESD-u and SPM train
one concept per step, in shuffled cycles, so each gets `--steps` / {len(four)}: they ran the toy preset's steps
× {len(four)}, each concept getting as many steps as a single-concept run; the toy preset for several concepts:
ESD-x erases every concept in context with its siblings preserved, at lr 5e-4 and eta 3; ESD-u takes each
concept's in-context and preserved prompts, as one concept's run, at the first concept's lr and eta; SPM takes
each concept's in-context prompts and own guidance, with Latent Anchoring weight 10). Loaded together: the {len(four)} single-concept adapters, each
trained with its own concept's preset, loaded at once with `pipe.load_erasure`; time: the sum of their runs.
Fused: `unsee fuse` of the {len(four)} adapters into one file, ESD-x's with `--method stack` (the sum of their
deltas), UCE's and ESD-x-strict's (keys and values only) with `--method mace`, MACE's closed-form refit of the keys
and values, with the toy model's preset: each adapter refitted on its own prompts and on 16 world prompts naming its
concept (a prompt naming several of the concepts refitted to their adapters' changes summed), "" and 48 world
prompts naming none of them preserved; AdvUnlearn's (text-encoder deltas) with `--method distill`: a text-encoder
delta trained for 2000 steps so that each adapter's prompts (MACE's, as above) get the embeddings that adapter gives
them and the preserved prompts the original ones; time: theirs plus the fuse.
Accuracy on {args.n} prompts (shape, colour, background) that name none of the concepts.

{four_table(parts['four'])}""")
    elif "four" in carried:
        blocks.append(carried["four"])
    if "curve" in parts:
        curve = parts["curve"]
        kept = ", ".join(KEPT.values())
        blocks.append(f"""### Concepts erased against what is left

{load_note(_adapters({"curve": curve}))}
k concepts erased, the first k of: {', '.join(curve['concepts'])} (five of the six shapes, five
of the six colours, and the striped style; the {kept} and the three backgrounds are never erased). uce, rece: one
solve of the k concepts (guides: the next value of each attribute that is not erased, so with every other shape
erased they all go to the heart). uce-stacked, esd-x-stacked: the k single-concept adapters loaded together (each
trained once, with its concept's preset, and reused at every k; time: the sum of their runs); a -mace row: those
adapters fused into one with `unsee fuse --method mace` (time: theirs plus the fuse's). Mean presence: over
the erased concepts, {args.n} images each. Accuracy on {args.n} prompts naming none of the erased concepts (against
the original model's on the same prompts). Kept prompts: {args.n} prompts of a {KEPT['color']} {KEPT['shape']} on
each background, judged per attribute.{args.stacked_note}

{curve_table(curve)}""")
    elif "curve" in carried:
        blocks.append(carried["curve"])
    if bench.failures:
        blocks.append("Failed runs: " + "; ".join(bench.failures))
    plural = "s" if len(parts) > 1 else ""
    written = f"the {', '.join(parts)} part{plural} of this section" if carried else "this section"
    blocks.append(f"Compute behind {written}: {stored / 60:.0f} min of wall time (every `unsee erase`/`unsee fuse` "
                  "run and every measurement, summed over resumed runs).")
    return "\n\n".join(blocks) + "\n"


def _adapters(parts: dict) -> list[dict]:
    """Every adapter the parts used, once each."""
    seen: dict[str, dict] = {}
    for part in parts.values():
        for r in part["rows"]:
            for a in r.get("adapters") or [r.get("adapter")]:
                if a:
                    seen[a["key"]] = a
    return list(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=32, help="images per prompt set")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="adapters and measurements, kept for resuming (default /tmp/unsee-mass-erasure, "
                             "with --quick /tmp/unsee-mass-erasure-quick)")
    parser.add_argument("--parts", default="time,four,curve", help="comma-separated: time, four, curve")
    parser.add_argument("--time-methods", default=",".join(TIME_METHODS), help="methods of the time part")
    parser.add_argument("--four-methods", default=",".join(dict.fromkeys(NATIVE + STACKED)),
                        help="methods of the four part: one run (of uce, rece, esd-x, spm) and single-concept "
                             "adapters loaded together and fused (of uce, esd-x, esd-x-strict, spm)")
    parser.add_argument("--curve-methods", default=",".join(CURVE_METHODS),
                        help="uce, rece, esd-x, spm (one run of the k concepts), esd-x-stacked, spm-stacked (the "
                             "k single-concept adapters loaded together), esd-x-strict-mace, uce-mace (fused with "
                             "MACE's refit)")
    parser.add_argument("--ks", default=",".join(map(str, KS)),
                        help="the k of the curve (the first k of its concepts erased), comma-separated")
    parser.add_argument("--stacked-k", default=",".join(map(str, KS)),
                        help="the k of the *-stacked and *-mace curve rows of trained methods (closed-form ones: "
                             "every k)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: n 4, two concepts, 2 training steps per concept, nothing written")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    args = parser.parse_args()
    if args.quick:
        args.n, args.no_write = 4, True
        time_methods, four, curve, ks = ("uce", "esd-x"), ("circle", "star"), ("circle", "star"), (1, 2)
    else:
        time_methods, four, curve = tuple(args.time_methods.split(",")), FOUR, CURVE
        ks = tuple(int(k) for k in args.ks.split(",") if k.strip().isdigit())
        if len(ks) != len(args.ks.split(",")) or any(k < 1 or k > len(CURVE) for k in ks):
            parser.error(f"--ks {args.ks!r}: give comma-separated whole numbers from 1 to {len(CURVE)}")
    workdir = args.workdir or Path("/tmp/unsee-mass-erasure" + ("-quick" if args.quick else ""))
    stacked_ks = tuple(k for k in map(int, args.stacked_k.split(",")) if k in ks)
    cut = [k for k in ks if k not in stacked_ks]
    trained_stacked = [m for m in args.curve_methods.split(",")
                       if m.endswith(("-stacked", "-mace")) and m.rpartition("-")[0] not in CLOSED_FORM]
    args.stacked_note = (f" The {', '.join(trained_stacked)} rows stop short of k = {', '.join(map(str, cut))} (cut "
                         f"for time)." if cut and trained_stacked else "")
    bench = Bench(workdir, args.n, args.quick)
    wanted = args.parts.split(",")
    parts: dict[str, dict] = {}
    if "time" in wanted:
        parts["time"] = part_time(bench, time_methods)
    if "four" in wanted:
        parts["four"] = part_four(bench, four, tuple(args.four_methods.split(",")))
    if "curve" in wanted:
        parts["curve"] = part_curve(bench, curve, ks, tuple(args.curve_methods.split(",")), stacked_ks)
    settings = "; ".join(f"{m}: {shown_settings(preset_settings('toy', m, concept='circle'))}" for m in time_methods
                         if "time" in parts)
    body = section(parts, args, settings, bench)
    if not args.no_write:
        write_section(SECTION, body)
    print(body)


if __name__ == "__main__":
    main()
