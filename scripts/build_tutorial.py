"""Build docs/tutorial.ipynb from its readable source docs/tutorial.py, execute it, and write the README figures.

The notebook is generated, never edited by hand: edit docs/tutorial.py and run

    .venv/bin/python scripts/build_tutorial.py

Source format ("percent" format, as jupytext reads it): `# %%` starts a code cell, `# %% [markdown]` a markdown
cell whose lines are comments (`# text`); lines before the first marker are the file's own header and are not copied.
Attributes after the marker, `key="value"`, become cell metadata; `gallery="NAME.png"` marks a cell whose (last)
PNG figure is also written to docs/gallery/NAME.png for the README.

Execution: nbclient with the `python3` kernel (ipykernel; the kernel runs on this Python), working directory = the
repository root, no per-cell timing metadata, so a rebuild on the same machine reproduces the same notebook.
Every file is written atomically (temporary file in the same folder, then `os.replace`); an existing notebook is
replaced only after the whole notebook ran without an error.

Importable: `read_cells(text)`, `build_notebook(text)`, `execute(nb, cwd, timeout)`, `gallery_figures(nb)`.
"""
from __future__ import annotations

import argparse
import base64
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "docs" / "tutorial.py"
NOTEBOOK = ROOT / "docs" / "tutorial.ipynb"
GALLERY = ROOT / "docs" / "gallery"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}

MARKER = re.compile(r"^# %%(?P<markdown> \[markdown\])?(?P<attrs>(?: +[A-Za-z_]\w*=\"[^\"]*\")*) *$")
ATTR = re.compile(r"([A-Za-z_]\w*)=\"([^\"]*)\"")
GALLERY_NAME = re.compile(r"^[A-Za-z0-9_-]+\.png$")


@dataclass
class Cell:
    """One cell of the source: kind "code" or "markdown", its text, its metadata, and its 1-based first line."""

    kind: str
    text: str
    line: int
    metadata: dict[str, str] = field(default_factory=dict)


def _markdown_line(line: str, number: int) -> str:
    if line in ("#", ""):  # an empty comment line is a paragraph break; a blank line ends up stripped
        return ""
    if line.startswith("# "):
        return line[2:]
    raise ValueError(f"line {number}: a markdown cell's lines must be blank, '#' or start with '# ', got {line!r}")


def read_cells(text: str) -> list[Cell]:
    """The cells of a percent-format source `text`, in order. Blank lines around each cell are dropped.

    Raises ValueError (with the line number) for a line starting with `# %%` that is not a valid marker, a
    markdown line that is not a comment, an empty cell, a `gallery` value that is not a plain `NAME.png`, or a
    gallery name used twice.
    """
    cells: list[Cell] = []
    current: Cell | None = None
    body: list[str] = []

    def close():
        if current is None:
            return
        while body and not body[-1].strip():
            body.pop()
        while body and not body[0].strip():
            body.pop(0)
        if not body:
            raise ValueError(f"line {current.line}: empty {current.kind} cell")
        current.text = "\n".join(body)
        cells.append(current)

    for number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("# %%"):
            match = MARKER.match(line)
            if match is None:
                raise ValueError(f"line {number}: bad cell marker {line!r}; allowed: '# %%', '# %% [markdown]', "
                                 "optionally followed by key=\"value\" attributes")
            close()
            current = Cell("markdown" if match["markdown"] else "code", "", number, dict(ATTR.findall(match["attrs"])))
            body = []
        elif current is not None:
            body.append(_markdown_line(line, number) if current.kind == "markdown" else line)
    close()
    names = [c.metadata["gallery"] for c in cells if "gallery" in c.metadata]
    for name in names:
        if not GALLERY_NAME.match(name):
            raise ValueError(f"gallery={name!r}: must be a file name NAME.png (letters, digits, _ and -)")
    if len(set(names)) != len(names):
        raise ValueError(f"gallery names must be unique, got {names}")
    return cells


def build_notebook(text: str) -> nbformat.NotebookNode:
    """An unexecuted nbformat-4 notebook of the percent-format source `text` (validated by nbformat)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(read_cells(text)):
        make = nbformat.v4.new_code_cell if cell.kind == "code" else nbformat.v4.new_markdown_cell
        nb.cells.append(make(cell.text, metadata=dict(cell.metadata), id=f"cell-{i:02d}"))
    nbformat.validate(nb)
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path = ROOT, timeout: int = 600, threads: int | None = 1
            ) -> nbformat.NotebookNode:
    """Run every cell of `nb` in a fresh python3 kernel started in `cwd`; `timeout` in seconds per cell.

    `threads`: the kernel's OMP_NUM_THREADS (torch's intra-op threads); 1 by default because the tiny model's small
    convolutions run faster on one thread than handed between two (tests/conftest.py); None keeps the environment's.
    Returns `nb` with its outputs (changed in place, as nbclient does). Raises nbclient's CellExecutionError when a
    cell fails and CellTimeoutError when one runs longer than `timeout`."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    client = NotebookClient(nb, timeout=timeout, kernel_name=KERNELSPEC["name"], record_timing=False,
                            resources={"metadata": {"path": str(cwd)}})
    return client.execute(env=env)


def gallery_figures(nb: nbformat.NotebookNode) -> dict[str, bytes]:
    """{name: PNG bytes} of the cells marked `gallery="NAME.png"`: each cell's last image/png output.

    Raises ValueError for a marked cell without a PNG output (not executed, or it drew nothing)."""
    figures = {}
    for cell in nb.cells:
        name = cell.metadata.get("gallery")
        if name is None:
            continue
        pngs = [o["data"]["image/png"] for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        if not pngs:
            raise ValueError(f"cell {cell.get('id')} (gallery={name!r}) has no image/png output")
        figures[name] = base64.b64decode(pngs[-1])
    return figures


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644  # mkstemp makes 0o600
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", type=Path, default=SOURCE, help=f"percent-format source (default {SOURCE})")
    ap.add_argument("--output", type=Path, default=NOTEBOOK, help=f"notebook to write (default {NOTEBOOK})")
    ap.add_argument("--gallery", type=Path, default=GALLERY,
                    help=f"folder for the gallery=... figures (default {GALLERY})")
    ap.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell (default 600)")
    ap.add_argument("--no-execute", action="store_true",
                    help="write the notebook without outputs (and no gallery figures)")
    args = ap.parse_args(argv)
    if not args.source.is_file():
        ap.error(f"--source: {args.source} does not exist")
    if args.timeout <= 0:
        ap.error(f"--timeout: {args.timeout}; must be a positive number of seconds")

    nb = build_notebook(args.source.read_text(encoding="utf-8"))
    if not args.no_execute:
        start = time.perf_counter()
        execute(nb, ROOT, args.timeout)
        print(f"executed {len(nb.cells)} cells in {time.perf_counter() - start:.0f} s")
    write_atomic(args.output, (nbformat.writes(nb) + "\n").encode("utf-8"))
    print(f"wrote {args.output}")
    if not args.no_execute:
        for name, png in gallery_figures(nb).items():
            write_atomic(args.gallery / name, png)
            print(f"wrote {args.gallery / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
