"""Deletion and insertion: the batched computation equals a plainly written one-image-at-a-time one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from timm.models.vision_transformer import VisionTransformer
from torchvision.transforms import functional as TF

from common.metric_settings import Baseline
from tests.trained_vit import TASK
from worker.metrics import canvas, patch_ranks, perturbation_curves, rise_kernel, seeded_draws, step_counts


@pytest.mark.parametrize(
    ("patches", "steps", "counts"),
    [
        (196, 14, [14 * s for s in range(15)]),
        (64, 8, [8 * s for s in range(9)]),
        (10, 4, [0, 3, 5, 8, 10]),  # 2.5 and 7.5 round half up
        (4, 9, [0, 1, 2, 3, 4]),  # more steps than patches: one patch per step
    ],
)
def test_step_counts(patches: int, steps: int, counts: list[int]) -> None:
    assert step_counts(patches, steps) == counts


def test_ranks_put_the_largest_value_first_and_break_ties_by_the_given_permutation() -> None:
    maps = torch.tensor([[[0.1, 0.9, 0.5, 0.7]], [[0.2, 0.2, 0.2, 0.2]]])
    tie_breaks = torch.tensor([[0, 1, 2, 3], [2, 0, 3, 1]])
    ranks = patch_ranks(maps, tie_breaks)
    assert ranks[0, 0].tolist() == [3, 0, 2, 1]
    assert ranks[1, 0].tolist() == [1, 3, 0, 2]  # a flat map follows the permutation: 2, 0, 3, 1


def test_canvases() -> None:
    images = torch.randn(2, 3, 16, 16)
    assert torch.equal(canvas(images, Baseline.MEAN), torch.zeros_like(images))
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(canvas(flat, Baseline.BLUR), flat, atol=1e-6)  # blurring a constant changes nothing
    blurred = canvas(images, Baseline.BLUR, blur_sigma=2.0)
    assert torch.allclose(blurred, TF.gaussian_blur(images, [13, 13], [2.0, 2.0]))
    assert blurred.std() < images.std()


def _rise_blur(x: torch.Tensor) -> torch.Tensor:
    """RISE's released canvas (eclique/RISE, ``evaluation.py``), written as it is there."""
    klen, nsig = 11, 5
    inp = np.zeros((klen, klen))
    inp[klen // 2, klen // 2] = 1
    k = gaussian_filter(inp, nsig)
    kern = np.zeros((3, 3, klen, klen))
    kern[0, 0] = k
    kern[1, 1] = k
    kern[2, 2] = k
    return torch.nn.functional.conv2d(x, torch.from_numpy(kern.astype("float32")), padding=klen // 2)


def test_the_rise_canvas_is_rises_own_at_any_size() -> None:
    impulse = np.zeros((11, 11))
    impulse[5, 5] = 1
    np.testing.assert_array_equal(rise_kernel().numpy(), gaussian_filter(impulse, 5).astype(np.float32))
    assert float(rise_kernel().sum()) == pytest.approx(1.0, abs=1e-6)
    for side in (224, 64):  # RISE's kernel is fixed in pixels: not rescaled with the input
        images = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(side))
        ours = canvas(images, Baseline.RISE_BLUR, blur_sigma=9.0)  # blur_sigma does not apply
        assert torch.allclose(ours, _rise_blur(images), atol=1e-6)
    # Zero padding: a constant image darkens towards 0 (the mean colour) at the border, unlike ``blur``.
    flat = torch.ones(1, 3, 32, 32)
    rise = canvas(flat, Baseline.RISE_BLUR)
    assert float(rise[0, 0, 16, 16]) == pytest.approx(1.0, abs=1e-6)
    assert float(rise[0, 0, 0, 0]) < 0.4
    assert torch.allclose(canvas(flat, Baseline.BLUR), flat, atol=1e-6)


def _plain_curve(
    model: VisionTransformer,
    image: torch.Tensor,
    target: int,
    saliency: np.ndarray,
    tie_break: np.ndarray,
    steps: int,
    base: torch.Tensor,
    insertion: bool,
) -> tuple[list[float], float]:
    """One image, one map, one perturbed picture at a time, with explicit loops over patches."""
    gh, gw = saliency.shape
    patch = image.shape[-1] // gw
    P = gh * gw
    # Most important first; equal values in the order of the tie-break permutation.
    order = sorted(range(P), key=lambda j: (-float(saliency.flat[j]), int(np.where(tie_break == j)[0][0])))
    steps = min(steps, P)
    curve, xs = [], []
    for s in range(steps + 1):
        k = int(np.floor(s * P / steps + 0.5))
        touched = set(order[:k])
        picture = (base if insertion else image).clone()
        source = image if insertion else base
        for j in touched:
            i, jj = divmod(j, gw)
            window = (slice(None), slice(i * patch, (i + 1) * patch), slice(jj * patch, (jj + 1) * patch))
            picture[window] = source[window]
        with torch.no_grad():
            probs = model(picture[None]).softmax(-1)[0]
        curve.append(float(probs[target]))
        xs.append(k / P)
    area = sum((xs[i + 1] - xs[i]) * (curve[i] + curve[i + 1]) / 2 for i in range(len(curve) - 1))
    return curve, area


@pytest.mark.parametrize("steps", [8, 5])
def test_batched_curves_equal_one_image_at_a_time(trained_model: VisionTransformer, steps: int) -> None:
    images, labels, _ = TASK.sample(3, torch.Generator().manual_seed(7))
    targets = [int(t) for t in labels]
    generator = torch.Generator().manual_seed(3)
    maps = torch.rand(3, 2, TASK.grid, TASK.grid, generator=generator)
    maps[:, 1] = maps[:, 1].round(decimals=1)  # many ties
    tie_breaks = torch.stack([seeded_draws(seed, (TASK.grid, TASK.grid))[1] for seed in (1, 2, 3)])
    deletion_canvas = canvas(images, Baseline.MEAN)
    insertion_canvas = canvas(images, Baseline.BLUR)
    batched = perturbation_curves(
        trained_model,
        images,
        targets,
        maps,
        tie_breaks,
        steps=steps,
        deletion_canvas=deletion_canvas,
        insertion_canvas=insertion_canvas,
        max_batch=7,  # several chunks, one cut mid-image
    )
    assert batched.deletion is not None
    assert batched.insertion is not None
    assert batched.deletion_auc is not None
    assert batched.insertion_auc is not None
    for b in range(3):
        for m in range(2):
            saliency, tie_break = maps[b, m].numpy(), tie_breaks[b].numpy()
            for insertion, curves, aucs, base in (
                (False, batched.deletion, batched.deletion_auc, deletion_canvas[b]),
                (True, batched.insertion, batched.insertion_auc, insertion_canvas[b]),
            ):
                curve, area = _plain_curve(
                    trained_model, images[b], targets[b], saliency, tie_break, steps, base, insertion
                )
                np.testing.assert_allclose(curves[b, m].numpy(), curve, atol=2e-5)
                assert float(aucs[b, m]) == pytest.approx(area, abs=2e-5)


def test_only_the_families_asked_for_are_computed(trained_model: VisionTransformer) -> None:
    images, labels, _ = TASK.sample(2, torch.Generator().manual_seed(1))
    maps = torch.rand(2, 1, TASK.grid, TASK.grid)
    curves = perturbation_curves(
        trained_model,
        images,
        labels.tolist(),
        maps,
        torch.stack([torch.randperm(TASK.grid**2)] * 2),
        steps=4,
        deletion_canvas=canvas(images, Baseline.MEAN),
        insertion_canvas=canvas(images, Baseline.MEAN),
        insertion=False,
    )
    assert curves.insertion is None
    assert curves.insertion_auc is None
    assert curves.deletion is not None
    assert curves.deletion.shape == (2, 1, 5)
    assert torch.allclose(curves.fractions, torch.tensor([0, 0.25, 0.5, 0.75, 1.0]))


def test_chunks_that_do_not_fit_are_halved_with_the_same_curves(trained_model: VisionTransformer) -> None:
    """A device that holds 5 perturbed images: chunks of 16 fail, 8 fail, then 4s run; the curves
    and the progress are those of an unconstrained run."""
    images, labels, _ = TASK.sample(2, torch.Generator().manual_seed(5))
    maps = torch.rand(2, 2, TASK.grid, TASK.grid, generator=torch.Generator().manual_seed(6))
    arguments = (
        trained_model,
        images,
        labels.tolist(),
        maps,
        torch.stack([torch.randperm(TASK.grid**2)] * 2),
    )
    options = {
        "steps": 4,
        "deletion_canvas": canvas(images, Baseline.MEAN),
        "insertion_canvas": canvas(images, Baseline.BLUR),
    }
    expected = perturbation_curves(*arguments, **options, max_batch=64)
    sizes: list[int] = []
    progress: list[tuple[int, int]] = []

    def fits_five(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        sizes.append(args[0].shape[0])
        if args[0].shape[0] > 5:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handle = trained_model.register_forward_pre_hook(fits_five)
    try:
        halved = perturbation_curves(
            *arguments,
            **options,
            max_batch=16,
            on_progress=lambda done, total: progress.append((done, total)),
        )
    finally:
        handle.remove()
    total = 3 * 2 + 2 * 2 * 2 * 3  # 3 shared per image, then B · M · (S - 1) per family
    assert sizes[:3] == [16, 8, 4]
    assert set(sizes[2:-1]) == {4}
    assert progress[-1] == (total, total)
    assert [done for done, _ in progress] == sorted({min(4 * i, total) for i in range(1, total // 4 + 2)})
    for name in ("deletion", "insertion", "deletion_auc", "insertion_auc"):
        torch.testing.assert_close(getattr(halved, name), getattr(expected, name), atol=1e-6, rtol=0)
