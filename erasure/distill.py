"""Fusing text-encoder adapters by distillation: ``unsee fuse --method distill`` (not from a paper).

Several adapters that change the text encoder (AdvUnlearn's) become one ``text_encoder`` delta, trained so that
the encoder with it gives, on the prompts of each source's concepts, the embeddings that source gives, and on the
preserved prompts the original encoder's:

    min_θ  Σ_b mean_{p ∈ P_b} ‖E_θ(p) − E_b(p)‖²  +  mean_{p ∈ K} ‖E_θ(p) − E_0(p)‖²

- E_b: the encoder with block b's sources loaded. A block is one source and the prompts that are its alone, or,
  for prompts naming the concepts of several sources, those sources loaded together: the split MACE's fusion
  makes (:func:`unsee.fuse.fuse_adapters` builds the blocks; the prompts are each source's concepts, templates and
  in-context prompts, and any given per concept).
- E_0: the original encoder; K: the preserved prompts (``""`` by default).
- E(p): the token embeddings the UNet reads (SDXL: both encoders' outputs side by side, and the pooled embedding in
  the loss too), as the pipeline computes them (:func:`unsee.pipelines.encoding.encode_text`).
- θ: every weight a source changes (the union of their tensors; a LoRA source counts as the weights its LoRA
  changes), starting from the original values. The result is their change, a ``text_encoder`` delta.

Each step draws ``batch_size`` prompts: ``erased_share`` of them from the blocks (in turn, a random prompt of
each, from a random first block) and the rest from K at random; one Adam step at ``lr``, decayed to 0 over
``steps`` on a cosine. The targets are computed once, before the first step. A step costs one forward and backward
pass of the text encoder: no UNet, no sampling.

Why not the other fusions: summing the deltas of a deep network (``stack``) does not give each prompt what its
own adapter gives it (the sources' changes interact through every later layer), and MACE's closed form fits only
linear layers that read the text embeddings. The numbers on the toy model are in ``docs/erasure.md``.

The pipeline is left as it was: the encoders' weights (and dtypes, when a half-precision encoder is trained in
float32) are restored after training, also after an error; no adapter may be loaded on it while distilling.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

import torch

from unsee.adapters import Adapter, AdapterError, match_adapter
from unsee.pipelines.encoding import encode_text

from .errors import ConfigError, TrainingError
from .fields import BATCH_SIZE, FRACTION, check_settings, integer, number, setting

__all__ = ["DistillConfig", "TextEncoderDistiller"]

#: prompts encoded per call when the targets are computed
_CHUNK = 64


@dataclass
class DistillConfig:
    """The settings of the distillation (defaults: the toy model's four-concept fusion, ``docs/erasure.md``)."""

    steps: int = setting(2000, integer(1, limits=(1, 100_000)))
    lr: float = setting(1e-4, number(positive=True), label="learning rate", says="a positive number such as 1e-4")
    batch_size: int = setting(32, BATCH_SIZE)
    erased_share: float = setting(0.5, FRACTION, label="share of each batch from the erased prompts")
    seed: int = setting(0, integer(0, limits=(0, 2**32 - 1)))

    def __post_init__(self) -> None:
        check_settings(self)


class TextEncoderDistiller:
    """The ``distill=`` of :func:`unsee.fuse.fuse_adapters` (``method="distill"``) for ``pipe``'s text encoders:
    ``TextEncoderDistiller(pipe)(sources, blocks, preserve) -> tensors``. ``progress``: a tqdm bar over the steps.
    """

    def __init__(self, pipe: Any, config: Optional[DistillConfig] = None, progress: bool = False) -> None:
        self.pipe = pipe
        self.config = config if config is not None else DistillConfig()
        self.progress = progress

    @property
    def settings(self) -> dict[str, Any]:
        """What the fused adapter's hyperparameters record of this distillation."""
        return asdict(self.config)

    def __call__(self, sources: Sequence[Adapter], blocks: Sequence[tuple[Sequence[int], Sequence[str]]],
                 preserve: Sequence[str]) -> dict[str, torch.Tensor]:
        """The fused ``text_encoder.*`` / ``text_encoder_2.*`` deltas (float32) of ``sources``; ``blocks``: (the
        indices of the sources loaded together, the prompts they give the targets of)."""
        pipe = self.pipe
        if getattr(pipe, "active_erasures", None):
            raise ConfigError(f"the pipeline has erasure adapters loaded ({', '.join(pipe.active_erasures)}); "
                              f"distillation needs the original model: call pipe.unload_erasure() first")
        blocks = [(tuple(indices), list(texts)) for indices, texts in blocks if texts]
        if not blocks or not preserve:
            raise ConfigError("distillation needs prompts of the erased concepts and prompts to preserve")
        params = self._parameters(sources)
        encoders = {key.split(".", 1)[0] for key in params}
        targets = [self._targets(texts, [sources[j] for j in indices]) for indices, texts in blocks]
        keep = self._targets(list(preserve), [])
        saved = {key: p.detach().clone() for key, p in params.items()}
        modules = [m for m in (getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")) if m is not None]
        flags = [[p.requires_grad for p in m.parameters()] for m in modules]
        dtypes = {name: next(getattr(pipe, name).parameters()).dtype for name in encoders}
        modes = {name: getattr(pipe, name).training for name in encoders}
        try:
            for name in encoders:
                getattr(pipe, name).to(torch.float32).eval()
            for module in modules:
                module.requires_grad_(False)
            for p in params.values():
                p.requires_grad_(True)
            originals = {key: value.to(torch.float32) for key, value in saved.items()}
            self._train(params, blocks, targets, list(preserve), keep)
            return {key: (p.detach() - originals[key]).float().contiguous() for key, p in params.items()}
        finally:
            for name in encoders:
                getattr(pipe, name).to(dtypes[name]).train(modes[name])
            with torch.no_grad():  # module.to keeps the parameter objects: params are still the encoders'
                for key, value in saved.items():
                    params[key].copy_(value)
            for module, kept in zip(modules, flags):
                for p, flag in zip(module.parameters(), kept):
                    p.requires_grad_(flag)

    # -- the parts --------------------------------------------------------------------------------------------

    def _parameters(self, sources: Sequence[Adapter]) -> dict[str, torch.nn.Parameter]:
        """Every text-encoder weight a source changes, by its delta key (``text_encoder.<parameter name>``), as
        :func:`~unsee.adapters.match_adapter` finds it in the pipeline (which checks each source against it)."""
        params: dict[str, torch.nn.Parameter] = {}
        for i, source in enumerate(sources):
            try:
                targets = match_adapter(self.pipe, source)
            except AdapterError as error:
                raise AdapterError(f"adapter {i + 1} ({source.method} {', '.join(source.concepts)}): {error}") from None
            for target in targets:
                module = getattr(self.pipe, target.component)
                params.setdefault(f"{target.component}.{target.name}", module.get_parameter(target.parameter))
        return params

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        embeds, pooled = encode_text(self.pipe, texts, self.pipe.text_encoder.device
                                     if getattr(self.pipe, "text_encoder", None) is not None
                                     else self.pipe.text_encoder_2.device)
        return embeds.float(), None if pooled is None else pooled.float()

    def _targets(self, texts: list[str], sources: Sequence[Adapter]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The embeddings of ``texts`` with ``sources`` loaded together (none: the original encoder)."""
        pipe = self.pipe
        try:
            for i, source in enumerate(sources):
                pipe.load_erasure(source, adapter_name=f"distill-source-{i}")
            with torch.no_grad():
                parts = [self._encode(texts[i: i + _CHUNK]) for i in range(0, len(texts), _CHUNK)]
        finally:
            if sources:
                pipe.unload_erasure()
        pooled = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
        return torch.cat([p[0] for p in parts]), pooled

    def _train(self, params: dict[str, torch.nn.Parameter], blocks: list[tuple[tuple[int, ...], list[str]]],
               targets: list[tuple[torch.Tensor, Optional[torch.Tensor]]], preserve: list[str],
               keep: tuple[torch.Tensor, Optional[torch.Tensor]]) -> None:
        config = self.config
        generator = torch.Generator().manual_seed(config.seed)
        optimizer = torch.optim.Adam(list(params.values()), lr=config.lr)
        n_erased = max(1, round(config.batch_size * config.erased_share))
        n_keep = config.batch_size - n_erased
        pools = [(texts, target) for (_, texts), target in zip(blocks, targets)] + [(preserve, keep)]
        steps = range(config.steps)
        if self.progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="distilling", unit="step")
        for step in steps:
            for group in optimizer.param_groups:  # cosine decay to 0 over the steps
                group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * step / config.steps))
            first = int(torch.randint(len(blocks), (1,), generator=generator))
            draws = [((first + j) % len(blocks), int(torch.randint(len(blocks[(first + j) % len(blocks)][1]), (1,),
                                                                   generator=generator)))
                     for j in range(n_erased)]
            draws += [(len(blocks), int(i)) for i in torch.randint(len(preserve), (n_keep,), generator=generator)]
            texts = [pools[b][0][i] for b, i in draws]
            embeds, pooled = self._encode(texts)
            target = torch.stack([pools[b][1][0][i] for b, i in draws]).to(embeds.device)
            loss = torch.nn.functional.mse_loss(embeds, target)
            if pooled is not None:
                pooled_target = torch.stack([pools[b][1][1][i] for b, i in draws]).to(pooled.device)
                loss = loss + torch.nn.functional.mse_loss(pooled, pooled_target)
            if not torch.isfinite(loss):
                raise TrainingError(f"the distillation loss became {loss.item()} at step {step + 1}; lower lr "
                                  f"(now {config.lr:g})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
