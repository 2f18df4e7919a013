"""The UnlearnDiffAtk-style robustness evaluator (tiny SD pipeline, a stand-in judge)."""

from __future__ import annotations

import pytest
import torch

from unsee.attack import AttackConfig, attack_prompt, project_to_simplex
from unsee.cli import main
from unsee.toy import attack


def test_projection_onto_the_simplex():
    weights = torch.tensor([[0.5, 0.2, -0.3, 0.9], [0.0, 0.0, 1.0, 0.0], [3.0, 3.0, 3.0, 3.0]])
    projected = project_to_simplex(weights)
    assert torch.all(projected >= 0) and torch.allclose(projected.sum(-1), torch.ones(3))
    assert torch.equal(projected[1], weights[1])  # a one-hot row is already on the simplex
    assert torch.allclose(projected[2], torch.full((4,), 0.25))
    # the projection is the closest point: no random point of the simplex is closer
    points = torch.distributions.Dirichlet(torch.ones(4)).sample((2000,))
    best = (points - weights[0]).norm(dim=-1).min()
    assert (projected[0] - weights[0]).norm() <= best + 1e-6


def test_attack_loss_decreases_over_its_steps(erased):
    target = erased("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    config = AttackConfig(prefix_tokens=3, steps=12, lr=0.05, timesteps=4)
    result = attack_prompt(erased, "a red circle", target, config, torch.Generator().manual_seed(0))
    assert len(result.losses) == 13
    assert result.losses[-1] < result.losses[0]
    assert len(result.tokens) == 3 and result.adversarial_prompt.endswith("a red circle")


def test_attack_success_rate_and_erasures_left_as_they_were(erased):
    judged = []

    def judge(images):  # a stand-in: "sees" a circle in every other image
        judged.append(len(images))
        return [{"shape": "circle" if i % 2 else "square"} for i in range(len(images))]

    before = {k: v.clone() for k, v in erased.unet.state_dict().items()}
    result = attack(erased, "circle", n=4, judge=judge,
                    config=AttackConfig(prefix_tokens=2, steps=2, timesteps=2, num_inference_steps=2))
    assert judged == [4, 4]  # the erased model before the attack, then the attacked prompts
    assert result.presence_before == 0.5 and result.success_rate == 0.5  # prompts 1 and 3, before and after
    assert len(result.attacks) == 4 and all("circle" in a.adversarial_prompt or "ball" in a.adversarial_prompt
                                            or "disc" in a.adversarial_prompt for a in result.attacks)
    assert erased.active_erasures == {"esd-x-circle": 1.0}
    assert all(torch.equal(v, erased.unet.state_dict()[k]) for k, v in before.items())


def test_attack_cli_rejects_an_unknown_concept(capsys):
    assert main(["attack", "--adapter", "missing.safetensors", "--concept", "banana"]) == 2
    assert "banana" in capsys.readouterr().err


def test_attack_config_is_validated():
    with pytest.raises(ValueError, match="prefix_tokens must be a positive integer"):
        AttackConfig(prefix_tokens=0)
