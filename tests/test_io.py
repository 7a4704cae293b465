"""fusion_engine.utils.io: a file written through atomic_write appears whole or not at all."""
from __future__ import annotations

import pytest
from PIL import Image

from fusion_engine.utils.io import atomic_write, save_image, write_text


def test_atomic_write_replaces_the_file_and_leaves_no_scratch(tmp_path):
    target = tmp_path / "sub" / "report.md"  # parent folders are made
    write_text(target, "old")
    assert write_text(target, "new") == target and target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.md"]


def test_an_error_inside_the_block_leaves_the_old_file_and_no_scratch(tmp_path):
    target = tmp_path / "trace.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as scratch:
        scratch.write_text("half of the new")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.json"]


def test_the_scratch_keeps_the_suffix_so_pillow_picks_the_format(tmp_path):
    image = Image.new("RGB", (5, 3), (200, 10, 30))
    path = save_image(image, tmp_path / "grid.png")
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == (5, 3) and saved.getpixel((4, 2)) == (200, 10, 30)
