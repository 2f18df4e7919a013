#!/usr/bin/env python
"""Full-weight erasure deltas against the LoRAs extracted from them, on the embedded toy model; writes its
BENCHMARKS.md section.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/lora_extraction.py [--methods esd-u,esd-x,salun,ant]
        [--ranks 1,4,16,64] [--n 64] [--no-write] [--log FILE]

For each method: train its "circle" adapter with the toy preset (as ``benchmarks/erasure_methods.py``, output kind
``delta``), measure the concept's presence on ``n`` prompts that name it and the judge's accuracy on ``n`` prompts
that do not; then for each rank R fit a rank-R LoRA to the delta by truncated SVD (``unsee export ADAPTER --format
kohya --rank R``, with ``--drop-other`` when the delta holds tensors that are not Linear/Conv weights, e.g. biases),
load the kohya file, and measure the same, with the fit's overall relative Frobenius error and the file's size.
Each finished row is appended to ``--log`` (JSON lines) and not run again; with ``--log`` the trained deltas are
kept next to it (``<log>-adapters/``) so that a resumed run does not retrain them.
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
from erasure_efficacy import EVAL_SEED, figures, world_prompts_text  # noqa: E402

import unsee  # noqa: E402
from unsee.adapter_export import export_adapter  # noqa: E402
from unsee.adapters import load_adapter  # noqa: E402
from unsee.erasure import make_trainer  # noqa: E402
from unsee.erasure.registry import METHODS as REGISTERED, config_fields  # noqa: E402
from unsee.lora_formats import is_lora_able  # noqa: E402
from unsee.toy.judge import Judge  # noqa: E402
from unsee.toy.presets import preset_settings  # noqa: E402

METHODS = ("esd-u", "esd-x", "salun", "ant")
RANKS = (1, 4, 16, 64)
CONCEPT = "circle"
WITHIN = 0.05  # presence within 5 points of the delta's


def method_settings(method: str) -> dict:
    """The toy preset's settings for ``method`` on the concept, asking for a ``delta`` where the method has a kind."""
    user = {"kind": "delta"} if "kind" in config_fields(REGISTERED[method].config) else {}
    return preset_settings("toy", method, concept=CONCEPT, settings=user)


def shown_settings(settings: dict) -> dict:
    return {k: world_prompts_text(v) if isinstance(v, (list, tuple)) else v for k, v in settings.items()}


def tensor_kind(key: str, tensor) -> str:
    """What a delta tensor that LoRA factors cannot hold is: a bias, a norm's scale, an embedding table..."""
    if key.endswith(".bias"):
        return "bias"
    leaf = key.rsplit(".", 2)[-2] if key.count(".") >= 1 else key
    if "norm" in leaf:
        return "norm weight"
    if "embed" in leaf:
        return "embedding"
    return f"{tensor.ndim}-d tensor"


def dropped_summary(tensors: dict) -> dict:
    """The delta's tensors that are not Linear/Conv weights: count by kind, and their share of the delta's norm."""
    kinds: dict[str, int] = {}
    dropped_norm2 = total_norm2 = 0.0
    for key, tensor in tensors.items():
        norm2 = float(tensor.detach().double().pow(2).sum())
        total_norm2 += norm2
        if not is_lora_able(key, tensor):
            kind = tensor_kind(key, tensor)
            kinds[kind] = kinds.get(kind, 0) + 1
            dropped_norm2 += norm2
    share = (dropped_norm2 / total_norm2) ** 0.5 if total_norm2 > 0 else 0.0
    return {"count": sum(kinds.values()), "kinds": kinds, "norm_share": share, "tensors": len(tensors)}


def row_key(row: dict) -> tuple:
    return (row["method"], row["variant"], row.get("rank"), row["n"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    parser.add_argument("--ranks", default=",".join(map(str, RANKS)), help="comma-separated LoRA ranks")
    parser.add_argument("--n", type=int, default=64, help="images per prompt set")
    parser.add_argument("--no-write", action="store_true", help="print, do not touch BENCHMARKS.md")
    parser.add_argument("--log", type=Path, default=None,
                        help="append each finished row here (JSON lines); rows already in it are not run again")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    ranks = sorted({int(r) for r in args.ranks.split(",") if r})
    for method in methods:
        if method not in REGISTERED:
            parser.error(f"unknown method {method!r}")

    done = [json.loads(line) for line in args.log.read_text().splitlines() if line.strip()] \
        if args.log and args.log.exists() else []
    logged = {row_key(r): r for r in done}
    pipe = judge = None

    def setup():
        nonlocal pipe, judge
        if pipe is None:
            pipe = unsee.load_pipeline("toy")
            pipe.set_progress_bar_config(disable=True)
            judge = Judge.load().predict

    def finish(row: dict) -> dict:
        logged[row_key(row)] = row
        print(json.dumps(row, default=float), flush=True)
        if args.log:
            with open(args.log, "a") as log:
                log.write(json.dumps(row, default=float) + "\n")
        return row

    def measure(path: Path) -> tuple[dict, float]:
        name = pipe.load_erasure(path)
        started = time.perf_counter()
        try:
            return figures(pipe, CONCEPT, args.n, judge), time.perf_counter() - started
        finally:
            pipe.unload_erasure(name)

    with tempfile.TemporaryDirectory() as tmp:
        keep = Path(str(args.log) + "-adapters") if args.log else Path(tmp)
        keep.mkdir(parents=True, exist_ok=True)
        if ("original", "original", None, args.n) not in logged:
            setup()
            started = time.perf_counter()
            before = figures(pipe, CONCEPT, args.n, judge)
            finish({"method": "original", "variant": "original", "rank": None, "n": args.n, "after": before,
                    "eval_seconds": time.perf_counter() - started})
        for method in methods:
            wanted = [(method, "delta", None, args.n)] + [(method, "lora", r, args.n) for r in ranks]
            if all(k in logged for k in wanted):
                continue
            setup()
            settings = method_settings(method)
            delta_path = keep / f"{method}-{CONCEPT}-delta.safetensors"
            train_seconds = None
            if delta_path.exists():  # trained by an earlier run: its training record holds the time
                adapter = load_adapter(delta_path)
                train_seconds = (adapter.training or {}).get("seconds")
            else:
                trainer = make_trainer(method, concept=CONCEPT, **settings)
                started = time.perf_counter()
                adapter = trainer.train(pipe)
                train_seconds = time.perf_counter() - started
                if adapter.kind != "delta":
                    raise SystemExit(f"{method} emitted a {adapter.kind!r} adapter, not a delta")
                adapter.save(delta_path)
            dropped = dropped_summary(adapter.tensors)
            if wanted[0] not in logged:
                after, seconds = measure(delta_path)
                finish({"method": method, "variant": "delta", "rank": None, "n": args.n, "after": after,
                        "relative_error": 0.0, "file_bytes": delta_path.stat().st_size,
                        "train_seconds": train_seconds, "eval_seconds": seconds, "dropped": dropped,
                        "settings": shown_settings(settings)})
            for rank in ranks:
                if (method, "lora", rank, args.n) in logged:
                    continue
                out = Path(tmp) / f"{method}-{CONCEPT}-r{rank}.safetensors"
                started = time.perf_counter()
                result = export_adapter(adapter, "kohya", out, rank=rank, drop_other=dropped["count"] > 0,
                                        overwrite=True)
                extract_seconds = time.perf_counter() - started
                after, seconds = measure(out)
                finish({"method": method, "variant": "lora", "rank": rank, "n": args.n, "after": after,
                        "relative_error": result.extraction.overall, "file_bytes": out.stat().st_size,
                        "modules": result.modules, "dropped_keys": len(result.extraction.dropped),
                        "extract_seconds": extract_seconds, "eval_seconds": seconds})
                out.unlink()

    # ---- the section, from the logged rows of this n
    rows = {k: r for k, r in logged.items() if k[3] == args.n}
    original = rows.get(("original", "original", None, args.n))
    complete = [m for m in methods if all((m, v, r, args.n) in rows
                                          for v, r in [("delta", None)] + [("lora", r) for r in ranks])]
    missing = [f"{m} {'delta' if v == 'delta' else f'LoRA rank {r}'}" for m in methods
               for v, r in [("delta", None)] + [("lora", r) for r in ranks] if (m, v, r, args.n) not in rows]

    def size(nbytes: int) -> str:
        return f"{nbytes / 2**20:.2f} MB" if nbytes >= 2**20 else f"{nbytes / 2**10:.0f} KB"

    def accuracy(r: dict) -> str:
        text = f"{r['after']['mean_accuracy']:.1%}"
        if original:
            text += f" ({100 * (r['after']['mean_accuracy'] - original['after']['mean_accuracy']):+.1f} pts)"
        return text

    lines = ["| method | variant | relative error | file size | circle presence | accuracy elsewhere (change) |",
             "|---|---|---|---|---|---|"]
    if original:
        lines.append(f"| (original model) | — | — | — | {original['after']['presence']:.1%} "
                     f"| {original['after']['mean_accuracy']:.1%} |")
    sentences, dropped_notes, settings_notes = [], [], []
    for method in methods:
        delta = rows.get((method, "delta", None, args.n))
        if delta is not None:
            lines.append(f"| {method} | delta | — | {size(delta['file_bytes'])} | {delta['after']['presence']:.1%} "
                         f"| {accuracy(delta)} |")
            d = delta["dropped"]
            if d["count"]:
                kinds = ", ".join(f"{c} {k}{'es' if k == 'bias' and c > 1 else 's' if c > 1 else ''}"
                                  for k, c in sorted(d["kinds"].items()))
                dropped_notes.append(f"{method}: {d['count']} of {d['tensors']} delta tensors dropped ({kinds}; "
                                     f"{d['norm_share']:.2%} of the delta's Frobenius norm)")
            else:
                dropped_notes.append(f"{method}: none of its {d['tensors']} delta tensors dropped")
            settings_notes.append(f"{method}: " + ", ".join(f"{k}={v}" for k, v in delta["settings"].items()))
        for rank in ranks:
            r = rows.get((method, "lora", rank, args.n))
            if r is not None:
                lines.append(f"| {method} | LoRA rank {rank} | {r['relative_error']:.3f} | {size(r['file_bytes'])} "
                             f"| {r['after']['presence']:.1%} | {accuracy(r)} |")
        if delta is None:
            continue
        tried = [(rank, rows[(method, "lora", rank, args.n)]) for rank in ranks
                 if (method, "lora", rank, args.n) in rows]
        close = [abs(r["after"]["presence"] - delta["after"]["presence"]) <= WITHIN + 1e-9 for _, r in tried]
        lowest = next((rank for i, (rank, _) in enumerate(tried) if all(close[i:])), None)
        part = "" if method in complete else " (not every rank finished: " + ", ".join(
            f"rank {rank}" for rank in ranks if (method, "lora", rank, args.n) not in rows) + " missing)"
        if lowest is None:
            sentences.append(f"- {method}: no rank tried ({', '.join(str(k) for k, _ in tried) or 'none'}) keeps the "
                             f"circle presence within 5 points of the delta's {delta['after']['presence']:.1%}{part}.")
        else:
            hit = rows[(method, "lora", lowest, args.n)]
            sentences.append(f"- {method}: rank {lowest} is the lowest rank whose circle presence "
                             f"({hit['after']['presence']:.1%}) stays, with every higher rank tried, within 5 points "
                             f"of the delta's ({delta['after']['presence']:.1%}){part}.")
    trained = {r["method"]: r["train_seconds"] for r in logged.values() if r.get("train_seconds")}
    seconds = sum((trained.get(r["method"], 0) if r["variant"] == "delta" else 0) + r.get("eval_seconds", 0)
                  + r.get("extract_seconds", 0) for r in rows.values())
    missing_text = ("Missing rows (the run was stopped before them): " + ", ".join(missing) + ".") if missing else ""
    body = f"""## Erasure deltas against their extracted LoRAs on the toy model (`benchmarks/lora_extraction.py`)

Hardware: {hardware()}.

Each method's "{CONCEPT}" adapter, trained with the toy preset as a full-weight `delta` (the settings of the
erasure-methods section), and the LoRAs `unsee export ADAPTER --format kohya --rank R` fits to it by truncated SVD
per tensor (alpha = rank; each kohya file loaded back with `pipe.load_erasure`). Relative error: the fit's overall
relative Frobenius error over all delta tensors, dropped ones included (`‖ΔW − BA‖ / ‖ΔW‖`). Presence: share of
{args.n} images, from prompts that name {CONCEPT}, in which the judge sees it. Accuracy: the judge's mean
per-attribute accuracy on {args.n} prompts that do not name it (change: against the original model). 25 DDIM steps,
CFG 5, evaluation seed {EVAL_SEED}. Time for the rows below: {seconds / 60:.0f} min (training, extraction and
evaluation).

{chr(10).join(lines)}

{chr(10).join(sentences)}

Tensors left out of the LoRAs (`--drop-other`: not Linear/Conv weights): {'; '.join(dropped_notes)}.

Settings, the toy preset (`unsee/toy/presets.py`): {'; '.join(settings_notes)}.

{missing_text}
"""
    if not args.no_write:
        if not complete:
            print("no method has all its rows: BENCHMARKS.md left as it is", file=sys.stderr)
        else:
            write_section("lora-extraction", body)
    print(body)


if __name__ == "__main__":
    main()
