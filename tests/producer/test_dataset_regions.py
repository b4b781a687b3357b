"""The ``bbox`` and ``mask_uri`` columns the localization metrics read: checked per line at submit."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import InvalidDatasetError
from producer.dataset import read_dataset


def test_boxes_are_checked_and_masks_located_like_images(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text(
        "image_uri,bbox,mask_uri\n"
        'a.png," 10, 20.5,110,220 ",\n'
        "b.png,,masks/b.png\n"
        "c.png,,s3://bucket/c-mask.png\n"
    )
    first, second, third = read_dataset(path).rows
    assert first.metadata == {"bbox": "10,20.5,110,220", "mask_uri": ""}
    assert second.metadata == {"bbox": "", "mask_uri": (tmp_path / "masks" / "b.png").resolve().as_uri()}
    assert third.metadata["mask_uri"] == "s3://bucket/c-mask.png"


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ('"1,2,3"', "must be four numbers"),
        ('"1,2,x,4"', "must be four numbers"),
        ('"1,2,3,nan"', "must be four numbers"),
        ('"5,2,3,4"', "0 <= x0 < x1"),
        ('"1,4,3,4"', "0 <= y0 < y1"),
        ('"-1,2,3,4"', "0 <= x0 < x1"),
        # ASCII decimal numbers only, as documented: float() would take all of these.
        ('"1_0,1_0,2_00,2_00"', "must be four numbers"),
        ('"\u0661,\u0661,\u0662\u0660,\u0662\u0660"', "must be four numbers"),  # Arabic-Indic digits
        ('"\uff11,1,20,20"', "must be four numbers"),  # a full-width one
    ],
)
def test_bad_boxes_are_reported_with_their_line(tmp_path: Path, cell: str, message: str) -> None:
    path = tmp_path / "data.csv"
    path.write_text(f'image_uri,bbox\na.png,"0,0,1,1"\nb.png,{cell}\n')
    with pytest.raises(InvalidDatasetError, match=f"line 3: bbox .*{message}"):
        read_dataset(path)


def test_a_mask_uri_with_an_unsupported_scheme_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("image_uri,mask_uri\na.png,ftp://host/m.png\n")
    with pytest.raises(
        InvalidDatasetError, match=r"line 2: mask_uri 'ftp://host/m\.png': unsupported scheme"
    ):
        read_dataset(path)
