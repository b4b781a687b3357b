"""The compute core: a timm ViT and a batch of images in, attention artifacts out.

Pure tensor code (no I/O, no storage, no Celery); the formulas are written down in ``docs/methods.md``. Start at
``explain`` (everything for a batch, one forward + one backward) or use the pieces: ``capture`` for
``A`` and ``G``, then the artifact functions, each ``[L, B, H, N, N] -> [B, …]``.
"""

from worker.attention.capture import Capture, capture
from worker.attention.explain import Explanation, explain, explain_in_batches
from worker.attention.layer_maps import cls_attention, layer_scores
from worker.attention.prediction import top_k
from worker.attention.readout import Readout
from worker.attention.relevance import gradient_relevance
from worker.attention.rollout import attention_rollout, gradient_rollout, rollout_matrices
from worker.attention.support import ModelLayout, check_supported, model_layout

__all__ = [
    "Capture",
    "Explanation",
    "ModelLayout",
    "Readout",
    "attention_rollout",
    "capture",
    "check_supported",
    "cls_attention",
    "explain",
    "explain_in_batches",
    "gradient_relevance",
    "gradient_rollout",
    "layer_scores",
    "model_layout",
    "rollout_matrices",
    "top_k",
]
