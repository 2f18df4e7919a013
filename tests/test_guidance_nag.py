"""NAG (issue 24 item 4) and the per-method contract (items 1 and 5): NAG's invariants and formula, its composition
with CFG and PAG, the README's composition table, and the registry the CLI, the demo and the PNG keys share."""

import re
from pathlib import Path

import pytest
import torch

from test_guidance import BUILDERS, K, run, unet_call_counter
from unsee.guidance import CFG, FDG, NAG, NASA, PAG, CFGpp, GuidanceError, NegativeSteer, registry
from unsee.guidance.composition import composition_table
from unsee.guidance.nag import NAGAttention, nag_guide

README = Path(__file__).resolve().parents[1] / "README.md"
ALL_METHODS = [CFG, CFGpp, FDG, PAG, NegativeSteer, NASA, NAG]


# ------------------------------------------------------------------------------------------------ NAG invariants
@BUILDERS
def test_nag_scale_one_is_the_baseline_and_nag_uses_one_pass(build):
    pipe = build()
    calls = unet_call_counter(pipe)
    baseline = run(pipe, guidance_scale=1.0)
    assert torch.equal(run(pipe, negative_prompt="blue", guidance_scale=1.0, guidance=[NAG(1.0)]), baseline)
    calls.clear()
    steered = run(pipe, negative_prompt="blue", guidance_scale=1.0, guidance=[NAG(5.0)])
    assert len(calls) == K["num_inference_steps"]
    assert (steered - baseline).abs().max() > 1e-3


def test_nag_formula_with_scale_one_is_the_positive():
    torch.manual_seed(0)
    positive, negative = torch.randn(2, 3, 16, 2, 8)
    assert (nag_guide(positive, negative, 1.0, 2.5, 0.25, dims=(-2, -1)) - positive).abs().max() <= 1e-6


def test_nag_caps_the_norm_ratio_at_tau():
    torch.manual_seed(0)
    positive, negative = torch.randn(2, 2, 5, 12)
    out = nag_guide(positive, negative, 50.0, 2.0, 1.0)  # alpha 1: the capped extrapolation itself
    ratio = out.abs().sum(-1) / positive.abs().sum(-1)
    assert (ratio <= 2.0 + 1e-5).all() and (ratio > 1.99).any()


class ReferenceNAGProcessor:
    """NAG written out for a test, as the paper states it: Z~ = Z+ + phi (Z+ - Z-), r = |Z~|_1 / |Z+|_1 per token,
    Z^ = Z~ min(r, tau) / r, Z = alpha Z^ + (1 - alpha) Z+, then to_out."""

    def __init__(self, negative: torch.Tensor, scale: float, tau: float, alpha: float) -> None:
        self.negative, self.phi, self.tau, self.alpha = negative, scale - 1, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        heads = attn.heads

        def split(t):
            return t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)

        def attend(context):
            scores = split(attn.to_q(hidden_states)) @ split(attn.to_k(context)).transpose(-1, -2) * attn.scale
            return (scores.softmax(-1) @ split(attn.to_v(context))).transpose(1, 2).flatten(2)  # (rows, tokens, dim)

        positive, negative = attend(encoder_hidden_states), attend(self.negative)
        extrapolated = positive + self.phi * (positive - negative)
        ratio = extrapolated.abs().sum(-1, keepdim=True) / positive.abs().sum(-1, keepdim=True)
        capped = extrapolated * torch.clamp(ratio, max=self.tau) / ratio
        return attn.to_out[0](self.alpha * capped + (1 - self.alpha) * positive)


def test_nag_processor_matches_the_formula(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from unsee.pipelines.attention import attention_module_names, installed_processors

    unet = tiny_sd.unet
    cross = attention_module_names(unet, cross=True)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    prompt = torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator)
    negative = torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator)
    method = NAG(4.0, tau=1.5, alpha=0.5)
    edit = NAGAttention(frozenset(cross), negative, method)
    edit.rows = slice(0, 2)
    with torch.no_grad(), installed_processors(unet, [edit]):
        ours = unet(sample, 500, prompt).sample
    unet.set_attn_processor({f"{name}.processor": ReferenceNAGProcessor(negative, 4.0, 1.5, 0.5) if name in cross
                             else AttnProcessor2_0() for name in attention_module_names(unet)})
    with torch.no_grad():
        reference = unet(sample, 500, prompt).sample
    assert (ours - reference).abs().max() <= 1e-5


def test_nag_without_negative_steering_keeps_the_empty_prompt_in_the_unconditional_branch(tiny_sd):
    ours = run(tiny_sd, negative_prompt="blue", guidance_scale=5.0, guidance=[NAG(1.0)])
    assert torch.equal(ours, run(tiny_sd, guidance_scale=5.0))
    both = run(tiny_sd, negative_prompt="blue", guidance_scale=5.0, guidance=[NAG(1.0), NegativeSteer(start_step=0)])
    assert torch.equal(both, run(tiny_sd, negative_prompt="blue", guidance_scale=5.0))


def test_nag_end_window_limits_it_to_the_noisiest_steps(tiny_sd):
    full = run(tiny_sd, negative_prompt="blue", guidance_scale=5.0, guidance=[NAG(5.0)])
    early = run(tiny_sd, negative_prompt="blue", guidance_scale=5.0, guidance=[NAG(5.0, end=0.5)])
    never = run(tiny_sd, negative_prompt="blue", guidance_scale=5.0, guidance=[NAG(5.0, end=0.0)])
    assert (early - full).abs().max() > 1e-4 and (early - never).abs().max() > 1e-4


@BUILDERS
def test_nag_composes_with_cfg_and_pag_in_one_pass_per_step(build):
    pipe = build()
    calls = unet_call_counter(pipe)
    image = run(pipe, negative_prompt="blue", guidance_scale=5.0, guidance=[PAG(3.0), NAG(5.0)])
    assert torch.isfinite(image).all() and len(calls) == K["num_inference_steps"]
    pag_only = run(pipe, guidance_scale=5.0, guidance=[PAG(3.0)])
    assert torch.equal(run(pipe, negative_prompt="blue", guidance_scale=5.0, guidance=[PAG(3.0), NAG(1.0)]), pag_only)
    assert (image - pag_only).abs().max() > 1e-3


@pytest.mark.parametrize("guidance, negative, message", [
    ([NAG(5.0)], None, "need a negative prompt"),
    ([NAG(0.5)], "blue", "NAG.scale must be >= 1"),
    ([NAG(alpha=2.0)], "blue", "NAG.alpha must be in"),
    ([NAG(5.0), NASA(0.3)], "blue", "negative prompt inside cross-attention; use one of them"),
    ([NegativeSteer()], "blue", "needs classifier-free guidance"),
])
def test_composition_rules_are_enforced_before_work(tiny_sd, guidance, negative, message):
    calls = unet_call_counter(tiny_sd)
    with pytest.raises(GuidanceError, match=message):
        run(tiny_sd, negative_prompt=negative, guidance_scale=1.0, guidance=guidance)
    assert not calls


# ------------------------------------------------------------------------------------------------ the contract
def test_the_readme_composition_table_is_the_methods_declarations():
    text = README.read_text()
    found = re.search(r"<!-- composition table -->\n(.*?)\n<!-- end composition table -->", text, re.S)
    assert found, "README.md has the composition table between its markers"
    assert found[1].strip() == composition_table(ALL_METHODS).strip(), (
        "regenerate it: python -c 'from unsee.guidance import *; from unsee.guidance.composition import "
        "composition_table; print(composition_table([CFG, CFGpp, FDG, PAG, NegativeSteer, NASA, NAG]))'")


def test_the_executor_and_processor_know_no_method_by_name():
    import ast

    root = Path(__file__).resolve().parents[1] / "pipelines"
    method_modules = {"cfg", "cfgpp", "fdg", "nag", "nasa", "negative", "pag"}
    for name in ("guided.py", "attention.py"):
        tree = ast.parse((root / name).read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        modules = {n.module.rpartition(".")[2] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not names & {cls.__name__ for cls in ALL_METHODS}, name
        assert not modules & method_modules, name


def test_every_method_is_registered_and_options_round_trip():
    assert {entry.load() for entry in registry.METHODS} == set(ALL_METHODS) - {CFG}
    methods = [CFGpp(0.4), PAG(2.0, layers=("mid", "up_blocks.1")), NegativeSteer(start_step=2), NAG(3.0)]
    options = registry.options_of(methods)
    assert options["nag"] == 3.0 and options["pag_layers"] == "mid,up_blocks.1"
    assert registry.methods_from_options(options) == methods


def test_the_cli_builds_its_flags_from_the_registry():
    from unsee.cli import build_parser, guidance_from_args

    args = build_parser().parse_args(["generate", "--prompt", "x", "--nag", "4", "--pag", "2", "--negative", "y",
                                       "--out", "o"])
    assert guidance_from_args(args) == [PAG(2.0, layers=("mid",)), NAG(4.0)]
