import pytest
import torch

import models
from bench import precision
from bench.cell.train import prepare

TINY = ["resnet-tiny", "bert-tiny", "gpt2-tiny"]
CPU = torch.device("cpu")


def _skip_unless_cpu_runs(policy: str) -> None:
    """FP8 needs torchao (the test extra has it): without it, its policies skip here."""
    reason = precision.get(policy).unsupported_reason(CPU)
    if reason:
        pytest.skip(reason)


def test_fp32_turns_tf32_off_for_matmul_and_cudnn_and_tf32_turns_it_on():
    precision.get("tf32").apply_backend_flags()
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    precision.get("fp32").apply_backend_flags()
    assert not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.parametrize(
    ("name", "dtype", "scaled"),
    [
        ("fp32", None, False),
        ("tf32", None, False),
        ("fp16", torch.float16, True),
        ("bf16", torch.bfloat16, False),
        ("fp16-noscale", torch.float16, False),
        ("fp8", torch.bfloat16, False),  # what torchao does not convert runs in bf16
        ("fp8-rowwise", torch.bfloat16, False),
    ],
)
def test_policy_semantics(name, dtype, scaled):
    policy = precision.get(name)
    assert policy.scaler("cpu").is_enabled() is scaled
    layer = torch.nn.Linear(4, 4)
    with policy.autocast("cpu"):
        out = layer(torch.randn(2, 4))
    assert out.dtype == (dtype or torch.float32)
    assert layer.weight.dtype == torch.float32  # master weights stay FP32


def test_unknown_policy_lists_the_valid_names():
    with pytest.raises(ValueError, match="fp16-noscale, fp8, fp8-rowwise"):
        precision.get("fp4")


@pytest.mark.parametrize("policy", precision.NAMES)
@pytest.mark.parametrize("model", TINY)
def test_every_tiny_model_trains_under_every_policy(model, policy):
    _skip_unless_cpu_runs(policy)
    trainer = prepare(model, policy, batch_size=2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    losses = torch.stack([trainer.step() for _ in range(3)])
    assert torch.isfinite(losses).all()
    after = trainer.model.parameters()
    changed = [not torch.equal(a, p) for a, p in zip(before, after, strict=True)]
    assert any(changed)
    if trainer.scaler.is_enabled():  # the first steps may overflow at the initial 2^16 scale
        assert 1 <= trainer.optimizer_steps() <= 3
    else:
        assert trainer.optimizer_steps() == 3
    held = torch.bfloat16 if trainer.policy.param_dtype == "bfloat16" else torch.float32
    assert all(p.dtype == held for p in trainer.model.parameters())  # no cast behind our back


def test_scaler_skips_a_step_whose_gradients_are_not_finite():
    trainer = prepare("resnet-tiny", "fp16", batch_size=2)
    trainer.inputs[0, 0, 0, 0] = float("inf")  # poisons the loss, hence every gradient
    before = [p.detach().clone() for p in trainer.model.parameters()]
    scale = trainer.scaler.get_scale()
    loss = trainer.step()
    assert not torch.isfinite(loss)
    assert trainer.optimizer_steps() == 0
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters(), strict=True))
    assert trainer.scaler.get_scale() == scale * 0.5  # backoff after the skipped step


def test_without_a_scaler_the_same_step_is_applied():
    trainer = prepare("resnet-tiny", "fp16-noscale", batch_size=2)
    trainer.inputs[0, 0, 0, 0] = float("inf")
    trainer.step()
    assert trainer.optimizer_steps() == 1  # nothing guards the update: weights go non-finite
    assert any(not torch.isfinite(p).all() for p in trainer.model.parameters())


def test_grad_accum_averages_micro_batches():
    one = prepare("gpt2-tiny", "fp32", batch_size=2, seed=3)
    two = prepare("gpt2-tiny", "fp32", batch_size=2, seed=3, grad_accum=2)
    assert torch.allclose(one.step(), two.step())  # same batch twice: same mean loss


def test_cpu_runs_every_policy():
    for policy in precision.POLICIES.values():
        if policy.fp8_recipe is None:
            assert policy.unsupported_reason(CPU) is None
        else:  # emulated when torchao is there, else how to install it; nvfp4 has no CPU path
            reason = policy.unsupported_reason(CPU)
            assert reason is None or reason.endswith("pip install -e .[fp8]") or (
                policy.name == "nvfp4" and reason.startswith("nvfp4 needs CUDA"))
    assert models.get("gpt2-tiny")  # registry import stays cheap
