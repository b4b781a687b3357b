"""vitscope in a notebook: one call explains one image, one more draws a map over it.

    from vitscope import explain_image
    result = explain_image("deit_tiny_patch16_224", "cat.jpg", target="tabby")
    result.overlay("grad_rollout").save("cat_grad_rollout.png")

The same compute core, preprocessing and pictures as ``producer submit`` (``vitscope.api``), with no
database, queue or storage. Needs the worker's dependencies (torch, timm): ``pip install 'vitscope[worker]'``.
"""

from vitscope.api import ImageExplanation, Prediction, draw_overlay, explain_image

__all__ = ["ImageExplanation", "Prediction", "draw_overlay", "explain_image"]
