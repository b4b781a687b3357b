"""The producer runs where torch is not installed: it must never import torch, timm, transformers or
worker code (also for ``hf:`` names, which it routes to the transformers queue). A submit that
does not talk to S3 does not import boto3 either: it was a quarter of the command's start-up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import redis

SCRIPT = textwrap.dedent(
    """
    import sys
    from producer.cli import app
    try:
        app(["submit", sys.argv[1], "--models", "deit_tiny_patch16_224,vit_base_patch16_224,hf:facebook/dinov2-small"])
    except SystemExit as exit:
        assert exit.code == 0, exit.code
    heavy = sorted(
        m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "torchvision", "transformers", "worker")
    )
    print("HEAVY:", heavy)
    print("S3:", sorted(m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore", "s3transfer")))
    """
)


def test_distributed_submit_imports_no_torch(tmp_path: Path, broker_url: str) -> None:
    broker = broker_url
    csv = tmp_path / "data.csv"
    csv.write_text("image_uri\ns3://bucket/a.png\ns3://bucket/b.png\n")
    env = {
        **os.environ,
        "VITSCOPE_BROKER_URL": broker,
        "VITSCOPE_DATABASE_URL": f"sqlite:///{tmp_path / 'v.db'}",
    }
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(csv)], env=env, capture_output=True, text=True, timeout=120
    )
    client = redis.Redis.from_url(broker, socket_timeout=5)
    try:
        assert result.returncode == 0, result.stderr
        assert "HEAVY: []" in result.stdout
        assert "S3: []" in result.stdout
        assert client.llen("vitscope.deit_tiny") == 1
        assert client.llen("vitscope.vit_base") == 1
        assert client.llen("vitscope.transformers") == 1
    finally:
        client.close()


REPORT_SCRIPT = textwrap.dedent(
    """
    import sys
    from producer.cli import app
    for command in (["report", sys.argv[1], "--out", sys.argv[2]], ["figures", sys.argv[1], "--out", sys.argv[3], "--first", "1", "--no-pdf"]):
        try:
            app(command)
        except SystemExit as exit:
            assert exit.code in (0, None), (command, exit.code)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "torchvision", "worker"))
    print("HEAVY:", heavy)
    """
)


def test_report_and_figures_import_no_torch(report_batch, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            REPORT_SCRIPT,
            report_batch.batch_id,
            str(tmp_path / "site"),
            str(tmp_path / "f"),
        ],
        env={**os.environ, **report_batch.env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY: []" in result.stdout
    assert (tmp_path / "site" / "index.html").is_file()
    assert any((tmp_path / "f").glob("fig4_2-*.png"))
