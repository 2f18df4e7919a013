#!/usr/bin/env python
"""Train the embedded toy model and its judge from scratch, on the CPU, from a seed.

    python scripts/train_toy.py                     # every stage, writes weights/toy and weights/judge.safetensors
    python scripts/train_toy.py --stage unet        # one stage (the earlier ones must have run)

Stages, each resumable (state under --work, default checkpoints/toy):
1. data  - render the training scenes of the shapes world;
2. vae   - train the AutoencoderKL (64x64 RGB <-> 4x16x16) with an L1 + MSE reconstruction loss and a small KL term;
3. judge - train the judge CNN on clean renders and their VAE reconstructions, and report its accuracy on
           both (the reconstruction accuracy bounds what any UNet on these latents can reach);
4. unet  - train the UNet and the CLIP text encoder together on VAE latents, with 10% caption dropout
           (so classifier-free guidance works), v-prediction with min-SNR-5 loss weighting and an EMA of the weights;
5. export - write the diffusers folder weights/toy and the timing report.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from transformers import CLIPTextModel

from unsee.files import atomic_write
from unsee.toy import model as toy
from unsee.toy import world
from unsee.toy.judge import Judge

STAGES = ("data", "vae", "judge", "unet", "export")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_save(obj: object, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def log(work: Path, **fields: object) -> None:
    line = json.dumps({"time": round(time.time(), 1), **fields})
    print(line, flush=True)
    with open(work / "log.jsonl", "a") as f:
        f.write(line + "\n")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------- data
def stage_data(args: argparse.Namespace, work: Path) -> None:
    path = work / "data.npz"
    if path.exists():
        return
    start = time.time()
    rng = np.random.default_rng(args.seed)
    scenes = [world.sample_scene(rng) for _ in range(args.images)]
    images = np.stack([world.render(s) for s in scenes])
    fields = {f: np.array([getattr(s, f) for s in scenes]) for f in world.ATTRIBUTES}
    atomic_write(path, lambda tmp: np.savez(tmp, images=images, **fields))  # tmp ends in .npz: savez keeps the name
    log(work, stage="data", done=True, seconds=round(time.time() - start, 1))


def load_data(work: Path) -> tuple[np.ndarray, list[world.Scene]]:
    data = np.load(work / "data.npz")
    scenes = [world.Scene(str(sh), str(c), str(b), str(st), 32, 32, 16, 0)
              for sh, c, b, st in zip(data["shape"], data["color"], data["background"], data["style"])]
    return data["images"], scenes


# ------------------------------------------------------------------------------------------ vae
def stage_vae(args: argparse.Namespace, work: Path) -> None:
    if (work / "vae" / "config.json").exists():
        return
    images, _ = load_data(work)
    seed_everything(args.seed + 1)
    vae = AutoencoderKL(**toy.VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.vae_lr, total_steps=args.vae_steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(args.seed + 1)
    start = time.time()
    for step in range(args.vae_steps):
        idx = torch.randint(0, len(images), (args.vae_batch,), generator=gen).numpy()
        x = to_tensor(images[idx])
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=gen)
        recon = vae.decode(z).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel()
        # Scale equivariance (Skorokhodov et al. 2025, "Improving the Diffusability of Autoencoders"): the latent
        # downsampled 2x must decode to the image downsampled 2x, so the shapes' outlines live in the latent's low
        # frequencies, which a diffusion model learns first, instead of in fine latent detail (without it, blurring
        # the latent by half a pixel turns a cross into a blob, and the UNet's samples are blobs).
        x_half = F.avg_pool2d(x, 2)
        recon_half = vae.decode(F.avg_pool2d(z, 2)).sample
        equivariance = F.l1_loss(recon_half, x_half) + F.mse_loss(recon_half, x_half)
        loss = rec + args.vae_kl * kl + args.vae_scale_equivariance * equivariance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(work, stage="vae", step=step, rec=round(rec.item(), 5), kl=round(kl.item(), 4),
                equivariance=round(equivariance.item(), 5),
                elapsed=round(time.time() - start, 1))
    # SD convention: latents are multiplied by scaling_factor so that they have unit variance.
    with torch.no_grad():
        idx = np.random.default_rng(args.seed).choice(len(images), min(2048, len(images)), replace=False)
        z = torch.cat([vae.encode(to_tensor(images[idx[i:i + 256]])).latent_dist.sample(generator=gen)
                       for i in range(0, len(idx), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(work / "vae")
    log(work, stage="vae", done=True, seconds=round(time.time() - start, 1), scaling_factor=float(1.0 / z.std()))


def encode_dataset(work: Path, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training image (cached in latents.pt)."""
    path = work / "latents.pt"
    if path.exists():
        cached = torch.load(path)
        return cached["mean"], cached["std"]
    start = time.time()
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), 512):
            dist = vae.encode(to_tensor(images[i:i + 512])).latent_dist
            means.append(dist.mean.half())
            stds.append(dist.std.half())
    mean, std = torch.cat(means), torch.cat(stds)
    atomic_save({"mean": mean, "std": std}, path)
    log(work, stage="latents", done=True, seconds=round(time.time() - start, 1))
    return mean, std


# ---------------------------------------------------------------------------------------- judge
def judge_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    scenes = [world.sample_scene(rng) for _ in range(n)]
    images = np.stack([world.render(s) for s in scenes])
    labels = {name: torch.tensor([s.labels()[name] for s in scenes]) for name in world.ATTRIBUTES}
    empty = torch.tensor([s.shape == world.NO_SHAPE for s in scenes])
    for name in ("color", "style"):  # an empty scene has no colour or style to read
        labels[name][empty] = -100
    return images, labels


def judge_accuracy(judge: Judge, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    judge.eval()
    with torch.no_grad():
        logits = judge(images)
    judge.train()
    result = {}
    for name, out in logits.items():
        valid = labels[name] != -100
        result[name] = float((out.argmax(-1)[valid] == labels[name][valid]).float().mean())
    return result


def stage_judge(args: argparse.Namespace, work: Path) -> None:
    if (work / "judge.safetensors").exists():
        return
    seed_everything(args.seed + 2)
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.judge_steps, pct_start=0.05)
    rng = np.random.default_rng(args.seed + 2)
    gen = torch.Generator().manual_seed(args.seed + 2)
    val_images, val_labels = judge_batch(np.random.default_rng(args.seed + 3), 1000)
    val_x = to_tensor(val_images)
    start = time.time()
    for step in range(args.judge_steps):
        images, labels = judge_batch(rng, args.judge_batch)
        x = to_tensor(images)
        part = len(x) // 3
        with torch.no_grad():  # a third of each batch is seen through the VAE, as generated images are
            z = vae.encode(x[:part]).latent_dist.sample(generator=gen)
            x[:part] = vae.decode(z).sample.clamp(-1, 1)
        x = x + 0.03 * torch.randn(x.shape, generator=gen)
        logits = judge(x)
        loss = sum(F.cross_entropy(logits[n], labels[n], ignore_index=-100) for n in world.ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.judge_steps - 1:
            log(work, stage="judge", step=step, loss=round(loss.item(), 4),
                val=judge_accuracy(judge, val_x, val_labels), elapsed=round(time.time() - start, 1))
    judge.eval()
    with torch.no_grad():
        val_recon = torch.cat([vae.decode(vae.encode(val_x[i:i + 250]).latent_dist.mean).sample.clamp(-1, 1)
                               for i in range(0, len(val_x), 250)])
    judge.save(work / "judge.safetensors")
    log(work, stage="judge", done=True, seconds=round(time.time() - start, 1),
        accuracy_clean=judge_accuracy(judge, val_x, val_labels),
        accuracy_vae_reconstruction=judge_accuracy(judge, val_recon, val_labels))


# ----------------------------------------------------------------------------------------- unet
def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.unet_steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# Per-sample weights of the v-prediction loss, as functions of the SNR. In terms of the error on the clean
# latent x0, the plain v loss weighs a sample by snr + 1 (the nearly clean, easy steps dominate), min-SNR-5 by
# min(snr, 5) (the noisy steps that set the layout and the shape get almost nothing: snr is 0.25 at t = 560),
# and "clamped-snr" by clamp(snr, 1, 5): capped on the easy steps, never below 1 on the noisy ones.
# Measured on a 16-image set (600 steps, batch 64): min-SNR-5 reproduces all 8 judged training captions' shapes
# cleanly, clamped-snr only 5 of 8 and smeared: the nearly clean steps are what draw crisp outlines.
LOSS_WEIGHTINGS = {
    "v": lambda snr: torch.ones_like(snr),
    "min-snr-5": lambda snr: snr.clamp(max=5.0) / (snr + 1),
    "clamped-snr": lambda snr: snr.clamp(min=1.0, max=5.0) / (snr + 1),
}


def stage_unet(args: argparse.Namespace, work: Path) -> None:
    final = work / "unet_final.pt"
    if final.exists():
        return
    images, scenes = load_data(work)
    mean, std = encode_dataset(work, images)
    scaling = AutoencoderKL.load_config(work / "vae")["scaling_factor"]
    tokenizer = toy.build_tokenizer(world.vocabulary())
    seed_everything(args.seed + 4)
    unet = UNet2DConditionModel(**toy.UNET_CONFIG)
    text_encoder = CLIPTextModel(toy.text_encoder_config(tokenizer))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema_unet = EMAModel(unet.parameters(), decay=args.ema, use_ema_warmup=True, power=0.75)
    ema_text = EMAModel(text_encoder.parameters(), decay=args.ema, use_ema_warmup=True, power=0.75)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in toy.SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    gen = torch.Generator().manual_seed(args.seed + 4)
    rng = np.random.default_rng(args.seed + 4)
    step, spent = 0, 0.0
    ckpt = work / "unet_ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        opt.load_state_dict(state["opt"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
        gen.set_state(state["gen"])
        rng = state["rng"]
        step, spent = state["step"], state["spent"]
        log(work, stage="unet", resumed_at=step)
    start = time.time() - spent
    while step < (args.stop_at or args.unet_steps):
        idx = rng.integers(0, len(scenes), args.unet_batch)
        captions = [world.caption(scenes[i], rng) if rng.random() >= args.dropout else "" for i in idx]
        ids = tokenizer(captions, padding="max_length", max_length=toy.MAX_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        idx_t = torch.from_numpy(idx)
        latents = (mean[idx_t].float() + std[idx_t].float() * torch.randn(mean[idx_t].shape, generator=gen)) * scaling
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        embeds = text_encoder(ids)[0]
        pred = unet(noisy, t, embeds).sample
        target = noise_scheduler.get_velocity(latents, noise, t)
        weight = LOSS_WEIGHTINGS[args.loss_weighting](snr[t])
        loss = (weight * F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))).mean()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        step += 1
        if step % 50 == 0 or step == args.unet_steps:
            log(work, stage="unet", step=step, loss=round(float(loss), 4), lr=round(lr_at(step, args), 6),
                elapsed=round(time.time() - start, 1))
        if step % args.checkpoint_every == 0 or step == args.unet_steps:
            atomic_save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "opt": opt.state_dict(),
                         "ema_unet": ema_unet.state_dict(), "ema_text": ema_text.state_dict(), "gen": gen.get_state(),
                         "rng": rng, "step": step, "spent": time.time() - start}, ckpt)
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    atomic_save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                 "seconds": time.time() - start}, final)
    log(work, stage="unet", done=True, seconds=round(time.time() - start, 1))


# --------------------------------------------------------------------------------------- export
def stage_export(args: argparse.Namespace, work: Path) -> None:
    tokenizer = toy.build_tokenizer(world.vocabulary())
    state = torch.load(work / "unet_final.pt")
    unet = UNet2DConditionModel(**toy.UNET_CONFIG)
    unet.load_state_dict(state["unet"])
    text_encoder = CLIPTextModel(toy.text_encoder_config(tokenizer))
    text_encoder.load_state_dict(state["text_encoder"])
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / "vae"), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**toy.SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(args.out)
    pipe.save_pretrained(out / "toy")
    Judge.load(work / "judge.safetensors").save(out / "judge.safetensors")
    seconds = {}
    for line in open(work / "log.jsonl"):
        entry = json.loads(line)
        if entry.get("done"):
            seconds[entry["stage"]] = entry["seconds"]
    report = {"seed": args.seed, "seconds_per_stage": seconds, "total_minutes": round(sum(seconds.values()) / 60, 1),
              "cpu_threads": torch.get_num_threads(), "args": vars(args)}
    (out / "toy" / "training_report.json").write_text(json.dumps(report, indent=2))
    log(work, stage="export", done=True, seconds=0, report=report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=STAGES + ("all",), default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="checkpoints/toy", help="resumable training state")
    parser.add_argument("--out", default=str(toy.WEIGHTS_DIR), help="where weights/toy and the judge are written")
    parser.add_argument("--images", type=int, default=40_000)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=1.5e-3)
    parser.add_argument("--vae-kl", type=float, default=5e-4)
    parser.add_argument("--vae-scale-equivariance", type=float, default=1.0,
                        help="weight of the 2x-downsampled reconstruction term (0: off)")
    parser.add_argument("--judge-steps", type=int, default=800)
    parser.add_argument("--judge-batch", type=int, default=96)
    parser.add_argument("--unet-steps", type=int, default=7000)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--loss-weighting", choices=("v", "min-snr-5", "clamped-snr"), default="min-snr-5",
                        help="per-sample weight of the v loss (see LOSS_WEIGHTINGS)")
    parser.add_argument("--stop-at", type=int, default=None, help="stop the UNet stage early at this step (experiments)")
    parser.add_argument("--dropout", type=float, default=0.1, help="caption dropout rate (for CFG)")
    parser.add_argument("--checkpoint-every", type=int, default=200)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        globals()[f"stage_{stage}"](args, work)


if __name__ == "__main__":
    main()
