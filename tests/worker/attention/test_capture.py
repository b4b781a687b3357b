"""Capturing ``A_l`` and ``G_l``: the right tensors, the right gradient, and nothing left behind."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import nn

from common.errors import InvalidTargetError, UnsupportedModelError
from tests.worker.attention.conftest import (
    CASE_TARGETS,
    VitRun,
    hooks_left,
    images,
    raise_in_forward,
    tiny_vit,
    vit,
)
from worker.attention import capture


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal up to ``rel`` of the largest magnitude (gradients of random models span many scales)."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def test_capture_layout_matches_the_architecture(vit_run: VitRun) -> None:
    case, result = vit_run.case, vit_run.capture
    gh, gw = case.grid_size
    N = case.num_prefix_tokens + gh * gw
    L, B, H = case.depth, len(CASE_TARGETS), vit_run.model.blocks[0].attn.num_heads
    assert result.num_prefix_tokens == case.num_prefix_tokens
    assert result.grid_size == case.grid_size
    assert result.attentions.shape == (L, B, H, N, N)
    assert result.gradients is not None
    assert result.gradients.shape == (L, B, H, N, N)
    assert result.logits.shape == (B, vit_run.model.num_classes)
    for tensor in (result.attentions, result.gradients, result.logits):
        assert tensor.dtype == torch.float32
        assert not tensor.requires_grad
        assert tensor.grad_fn is None
    assert result.targets.dtype == torch.int64


def test_captured_attention_is_the_softmax_recomputed_from_the_block_weights(vit_run: VitRun) -> None:
    reference = torch.from_numpy(vit_run.reference.attentions)
    torch.testing.assert_close(vit_run.capture.attentions, reference, rtol=1e-4, atol=1e-6)


def test_every_attention_row_sums_to_one(vit_run: VitRun) -> None:
    sums = vit_run.capture.attentions.sum(dim=-1, dtype=torch.float64)
    torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-5)


def test_captured_gradient_is_the_target_logit_gradient_of_the_reference(vit_run: VitRun) -> None:
    assert vit_run.capture.gradients is not None
    _close(vit_run.capture.gradients, torch.from_numpy(vit_run.reference.gradients))
    _close(vit_run.capture.logits, torch.from_numpy(vit_run.reference.logits))


def test_targets_are_given_classes_or_the_top1(vit_run: VitRun) -> None:
    top1 = vit_run.capture.logits.argmax(dim=1)
    expected = [int(top1[b]) if target is None else target for b, target in enumerate(CASE_TARGETS)]
    assert vit_run.capture.targets.tolist() == expected
    assert vit_run.reference.targets.tolist() == expected


def test_fused_attention_flags_are_restored_and_hooks_removed(vit_run: VitRun) -> None:
    flags = [module.fused_attn for module in vit_run.model.modules() if hasattr(module, "fused_attn")]
    assert flags
    assert all(flags), "capture must restore timm's fused attention after itself"
    assert hooks_left(vit_run.model) == 0


def test_gradients_match_finite_differences_of_the_attention() -> None:
    """``<G_l[b], E>`` is the change of ``y[b, t_b]`` when ``A_l[b]`` moves along ``E`` (float64)."""
    model = tiny_vit(torch.float64)
    # Unfused, so the perturbing hook below sees (and replaces) the attention of the plain forward.
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    batch = images(2, 32, dtype=torch.float64)
    result = capture(model, batch, [None, 3])
    assert result.gradients is not None
    generator = torch.Generator().manual_seed(5)
    eps = 1e-6
    for layer in range(len(model.blocks)):
        for b in range(2):
            direction = torch.zeros(result.attentions.shape[1:], dtype=torch.float64)
            direction[b] = torch.randn(direction.shape[1:], generator=generator, dtype=torch.float64)

            def shifted_logit(
                step: float, layer: int = layer, b: int = b, direction: torch.Tensor = direction
            ) -> float:
                hook = model.blocks[layer].attn.attn_drop.register_forward_hook(
                    lambda module, args, output: output + step * direction
                )
                try:
                    with torch.no_grad():
                        return float(model(batch)[b, result.targets[b]])
                finally:
                    hook.remove()

            numeric = (shifted_logit(eps) - shifted_logit(-eps)) / (2 * eps)
            analytic = float((result.gradients[layer].double() * direction).sum())
            assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_a_different_target_gives_a_different_gradient(tiny_model: nn.Module) -> None:
    batch = images(1, 32)
    first, second = capture(tiny_model, batch, [0]), capture(tiny_model, batch, [1])
    assert first.gradients is not None
    assert second.gradients is not None
    torch.testing.assert_close(first.attentions, second.attentions)
    assert not torch.allclose(first.gradients, second.gradients)


def test_batch_capture_equals_single_image_captures(tiny_model: nn.Module) -> None:
    batch = images(4, 32)
    targets = [None, 2, None, 4]
    together = capture(tiny_model, batch, targets)
    for b in range(4):
        alone = capture(tiny_model, batch[b : b + 1], [targets[b]])
        assert alone.gradients is not None
        assert together.gradients is not None
        torch.testing.assert_close(alone.attentions[:, 0], together.attentions[:, b], rtol=0, atol=1e-6)
        torch.testing.assert_close(alone.gradients[:, 0], together.gradients[:, b], rtol=1e-5, atol=1e-6)
        assert alone.targets.tolist() == [int(together.targets[b])]


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "frozen_parameters"])
def test_capture_works_whatever_the_callers_autograd_state(tiny_model: nn.Module, context: str) -> None:
    batch = images(2, 32)
    expected = capture(tiny_model, batch)
    if context == "no_grad":
        with torch.no_grad():
            result = capture(tiny_model, batch)
    elif context == "inference_mode":
        with torch.inference_mode():
            result = capture(tiny_model, batch.clone())
    else:
        tiny_model.requires_grad_(False)
        result = capture(tiny_model, batch)
    assert result.gradients is not None
    assert expected.gradients is not None
    torch.testing.assert_close(result.gradients, expected.gradients)
    assert all(parameter.grad is None for parameter in tiny_model.parameters())


def test_without_gradients_no_graph_is_built(tiny_model: nn.Module) -> None:
    seen: list[bool] = []
    tiny_model.blocks[0].attn.attn_drop.register_forward_hook(
        lambda module, args, output: seen.append(output.requires_grad)
    )
    batch = images(2, 32)
    result = capture(tiny_model, batch, gradients=False)
    with_gradients = capture(tiny_model, batch)
    assert result.gradients is None
    assert seen == [False, True]
    torch.testing.assert_close(result.attentions, with_gradients.attentions)
    torch.testing.assert_close(result.targets, with_gradients.targets)


def test_the_model_is_put_in_eval_mode(tiny_model: nn.Module) -> None:
    tiny_model.train()
    capture(tiny_model, images(1, 32))
    assert not any(module.training for module in tiny_model.modules())


def test_hooks_are_removed_and_flags_restored_when_forward_raises(tiny_model: nn.Module) -> None:
    tiny_model.blocks[-1].register_forward_pre_hook(raise_in_forward(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        capture(tiny_model, images(1, 32))
    assert hooks_left(tiny_model) == 0
    assert all(module.fused_attn for module in tiny_model.modules() if hasattr(module, "fused_attn"))


class _AlwaysFusedAttention(Attention):
    """An attention that ignores ``fused_attn``: its softmax never passes through ``attn_drop``."""

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, self.attn_dim)
        return self.proj(x)


def test_attention_that_bypasses_the_hook_is_an_unsupported_model(tiny_model: nn.Module) -> None:
    tiny_model.blocks[1].attn = _AlwaysFusedAttention(dim=16, num_heads=2)
    with pytest.raises(UnsupportedModelError, match=r"one attention map from each of 2 blocks, got \[1, 0\]"):
        capture(tiny_model, images(1, 32))
    assert hooks_left(tiny_model) == 0


def test_a_token_count_that_does_not_match_the_grid_is_an_unsupported_model() -> None:
    model = vit("deit_tiny_patch16_224", img_size=64, dynamic_img_size=True)
    with pytest.raises(UnsupportedModelError, match=r"expected \[1, H, 17, 17\]"):
        capture(model, images(1, 96))
    assert hooks_left(model) == 0


@pytest.mark.parametrize("target", [5, -1, 1000])
def test_targets_outside_the_classes_are_refused(tiny_model: nn.Module, target: int) -> None:
    with pytest.raises(InvalidTargetError, match=f"target class {target} is out of range for a model with 5"):
        capture(tiny_model, images(1, 32), [target])
    assert hooks_left(tiny_model) == 0


@pytest.mark.parametrize("targets", [[None], [1, 2, 3]])
def test_one_target_per_image_is_required(tiny_model: nn.Module, targets: list[int | None]) -> None:
    with pytest.raises(ValueError, match="targets for a batch of 2 images"):
        capture(tiny_model, images(2, 32), targets)


@pytest.mark.parametrize("shape", [(3, 32, 32), (0, 3, 32, 32)])
def test_images_must_be_a_non_empty_batch(tiny_model: nn.Module, shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        capture(tiny_model, torch.zeros(shape))


def test_bfloat16_autocast_stays_close_to_float32() -> None:
    model = vit("deit_tiny_patch16_224", img_size=112)
    batch = images(2, 112)
    exact = capture(model, batch)
    approx = capture(model, batch, exact.targets.tolist(), autocast_dtype=torch.bfloat16)
    assert approx.attentions.dtype == torch.float32
    assert approx.gradients is not None
    assert exact.gradients is not None
    assert approx.gradients.dtype == torch.float32
    torch.testing.assert_close(approx.attentions, exact.attentions, rtol=0, atol=2e-2)
    relative = (approx.gradients - exact.gradients).norm() / exact.gradients.norm()
    assert float(relative) < 0.1


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_repeated_captures_do_not_grow_memory_or_leave_hooks() -> None:
    """What a long-running worker needs: after 100 captures, nothing has accumulated.

    Each capture holds about 2 MiB of maps and gradients and more in its autograd graph, so keeping
    anything per call would grow the process by hundreds of MiB. The exact check: no tensor a capture
    returned outlives its result (weak references). The resident-size check compares two equal rounds
    after a warm-up, so the allocator's one-off growth (arenas, caches) cannot trip it, while a leak —
    which grows every round — does.
    """
    model = tiny_vit(img_size=64, patch_size=4, embed_dim=32)
    batch = images(1, 64)
    for _ in range(10):
        capture(model, batch)
    returned: list[weakref.ref[torch.Tensor]] = []
    sizes: list[int] = []
    for _ in range(2):
        gc.collect()
        sizes.append(_resident_bytes())
        for _ in range(50):
            result = capture(model, batch)
            returned += [weakref.ref(result.attentions), weakref.ref(result.logits)]
            if result.gradients is not None:
                returned.append(weakref.ref(result.gradients))
        del result
    gc.collect()
    sizes.append(_resident_bytes())
    assert sum(ref() is not None for ref in returned) == 0, "captured tensors outlive their results"
    grown = sizes[2] - sizes[1]
    assert grown < 40 * 2**20, f"memory grew by {grown / 2**20:.1f} MiB over the second 50 captures"
    assert hooks_left(model) == 0
    assert all(parameter.grad is None for parameter in model.parameters())
