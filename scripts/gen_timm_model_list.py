"""Regenerate common/data/timm_vit_models.txt from the installed timm.

The producer validates model names without importing timm (it must install without torch), so it
reads this list. tests/common/test_modelspec.py fails when the list and the installed timm disagree.
Run: python scripts/gen_timm_model_list.py
"""

from __future__ import annotations

from pathlib import Path

import timm
from timm.models._registry import _model_to_module

# Modules whose models are timm's VisionTransformer family with standard `Attention` blocks.
VIT_MODULES = ("vision_transformer", "deit")
TARGET = Path(__file__).resolve().parents[1] / "common" / "data" / "timm_vit_models.txt"


def vit_model_names() -> list[str]:
    return sorted(name for name in timm.list_models() if _model_to_module.get(name) in VIT_MODULES)


def render() -> str:
    header = f"# timm {timm.__version__} ViT/DeiT architectures (modules: {', '.join(VIT_MODULES)})\n"
    return header + "\n".join(vit_model_names()) + "\n"


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
