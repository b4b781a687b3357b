"""Regenerate common/data/timm_models.txt from the installed timm.

The producer validates model names without importing timm (it must install without torch), so it
reads this list. It holds every timm architecture: whether a model can be explained is decided by
the worker from the built model's structure (``worker.attention.support``), not from its name.
tests/common/test_modelspec.py fails when the list and the installed timm disagree.
Run: python scripts/gen_timm_model_list.py
"""

from __future__ import annotations

from pathlib import Path

import timm

TARGET = Path(__file__).resolve().parents[1] / "common" / "data" / "timm_models.txt"


def model_names() -> list[str]:
    """Every architecture the installed timm can build, without pretrained tags."""
    return sorted(timm.list_models())


def render() -> str:
    header = f"# timm {timm.__version__} architectures (every name timm.list_models() returns)\n"
    return header + "\n".join(model_names()) + "\n"


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET}")
