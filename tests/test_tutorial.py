"""docs/tutorial.ipynb: generated from docs/tutorial.py by scripts/build_tutorial.py, committed executed, and it runs.

- The committed notebook is exactly what the build makes of the source (cell kinds, texts, metadata): a hand edit
  of the notebook, or an edit of the source without a rebuild, fails here.
- It was committed executed, and the README's gallery figures are its figures.
- Executed again with nbclient in a fresh kernel, no cell fails. The notebook's own assertions are the parity checks
  of the tutorial: the hand-written Euler loop equals `pipeline.sample` bit for bit, hand-made CFG equals the
  sampler's `denoised`, the step-by-step img2img equals `pipeline.img2img` and `sdcore.process_images` (latents and
  uint8 pixels), and the step-by-step inpainting equals `pipeline.img2img` for the four blends.
- The percent-format reader: markers, attributes, errors.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import build_tutorial as bt  # noqa: E402

TIMEOUT_PER_CELL = 300  # seconds; the whole notebook takes 45-90 s on this shared 2-core machine (3 min allowed)


def committed():
    return nbformat.read(bt.NOTEBOOK, as_version=4)


def test_notebook_is_built_from_its_source():
    built = bt.build_notebook(bt.SOURCE.read_text(encoding="utf-8"))
    nb = committed()
    assert [(c.cell_type, c.source, dict(c.metadata)) for c in nb.cells] == \
           [(c.cell_type, c.source, dict(c.metadata)) for c in built.cells], \
        "docs/tutorial.ipynb is stale or hand-edited: run .venv/bin/python scripts/build_tutorial.py"
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_committed_notebook_is_executed_and_gallery_matches():
    nb = committed()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), "commit the notebook executed"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    figure_cells = [c for c in code if re.search(r"^show\(fig\)$", c.source, re.MULTILINE)]
    assert len(figure_cells) >= 10
    for c in figure_cells:
        assert any("image/png" in o.get("data", {}) for o in c.outputs), c.source[:80]
    figures = bt.gallery_figures(nb)
    assert set(figures) == {"tutorial_denoised.png", "tutorial_blends.png"}
    for name, png in figures.items():
        assert (bt.GALLERY / name).read_bytes() == png, f"docs/gallery/{name} differs from the notebook's figure"


@pytest.mark.slow  # 55-86 s on this shared 2-core machine (about 50 CPU-seconds): above the default tier's budget
def test_notebook_executes_without_errors():
    nb = bt.build_notebook(bt.SOURCE.read_text(encoding="utf-8"))
    start = time.perf_counter()
    bt.execute(nb, bt.ROOT, timeout=TIMEOUT_PER_CELL)  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - start
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    for claim in ("hand-written Euler loop == pipeline.sample: True",
                  "step-by-step img2img == pipeline.img2img == sdcore.process_images",
                  "inpaint_by_hand == pipeline.img2img for a1111, xt, soft_inpainting, differential",
                  "a1111 inpainting by hand == sdcore.process_images: True"):
        assert claim in text
    assert len(bt.gallery_figures(nb)) == 2
    print(f"notebook executed in {elapsed:.0f} s")


# -- the percent-format reader ----------------------------------------------------------------------------------------

def test_read_cells_kinds_text_and_attributes():
    text = "\n".join([
        "# header, not copied", "",
        "# %% [markdown]", "# # Title", "#", "# text", "",
        "# %%", "x = 1", "", "", "y = 2", "",
        '# %% gallery="fig_a.png" other="v"', "show(fig)",
    ])
    cells = bt.read_cells(text)
    assert [(c.kind, c.text, c.metadata, c.line) for c in cells] == [
        ("markdown", "# Title\n\ntext", {}, 3),
        ("code", "x = 1\n\n\ny = 2", {}, 8),
        ("code", "show(fig)", {"gallery": "fig_a.png", "other": "v"}, 14),
    ]
    nb = bt.build_notebook(text)
    assert [c.cell_type for c in nb.cells] == ["markdown", "code", "code"]
    assert nb.cells[2].metadata["gallery"] == "fig_a.png"


@pytest.mark.parametrize("text, message", [
    ("# %% [markdown]\nnot a comment\n", "line 2"),
    ("# %% [raw]\nx\n", "bad cell marker"),
    ("# %%\n\n# %%\nx = 1\n", "line 1: empty code cell"),
    ('# %% gallery="../escape.png"\nx\n', "gallery='../escape.png'"),
    ('# %% gallery="a.png"\nx\n# %% gallery="a.png"\ny\n', "unique"),
])
def test_read_cells_rejects(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        bt.read_cells(text)


def test_gallery_figures_needs_an_executed_cell():
    nb = bt.build_notebook('# %% gallery="a.png"\nx = 1\n')
    with pytest.raises(ValueError, match="no image/png output"):
        bt.gallery_figures(nb)


def test_write_atomic_replaces_and_keeps_mode(tmp_path):
    path = tmp_path / "f.bin"
    bt.write_atomic(path, b"one")
    assert path.read_bytes() == b"one" and path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o640)
    bt.write_atomic(path, b"two")
    assert path.read_bytes() == b"two" and path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
