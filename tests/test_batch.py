"""Manifest batches (sdcore/batch.py): output names from the row, resumable runs that never redo or overwrite a
finished row, the results table, bad rows recorded while the others go on, the folder batch as a manifest (same
bytes as `sdcore img2img --input-dir`), and the Ray engine (same bytes as the local one whatever the partitioning;
a worker killed mid-run, then a re-run)."""
from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import rect_mask
from sdcore.cli.flags import add_batch_parser
from sdcore import batch
from sdcore.cli import build_parser, main, processing_flags, resolve_values
from sdcore.cli import commands
from sdcore.cli.flags import DEFAULT_CKPT, UsageError

try:
    import ray
except ImportError:  # the optional extra sdcore[ray]
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed (pip install 'sdcore[ray]')")

# The bundled tiny model (64 px), the CLI's default --ckpt.
TINY = DEFAULT_CKPT
FAST = {"steps": 4, "denoising_strength": 0.5, "sampler_name": "Euler a"}  # 3 model steps at 64 px


@functools.lru_cache(maxsize=1)
def tiny_model():
    return batch.ModelSpec(TINY).load()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory, astronaut, coffee):
    d = tmp_path_factory.mktemp("pictures")
    astronaut.resize((64, 64)).save(d / "a.png")
    coffee.resize((64, 64)).save(d / "b.png")
    rect_mask((64, 64), (16, 16, 48, 48)).save(d / "m.png")
    rect_mask((32, 32), (8, 8, 24, 24)).save(d / "small.png")
    (d / "garbage.png").write_bytes(b"not a png")
    return d


def write_manifest(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def values(**fields):
    v = batch.default_values()
    v.update(FAST)
    v.update(fields)
    return v


def stamps(paths) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) per file: a rewritten file gets a new inode (link of a new temporary) and mtime."""
    return {str(p): (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in paths}


def read_table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# -- local engine ----------------------------------------------------------------------------------------------------

def test_names_results_table_and_resume_without_redoing(pictures, tmp_path, capsys):
    manifest = write_manifest(pictures / "m1.csv", ["image", "seed", "mask", "prompt", "opts.img2img_fix_steps"], [
        ["a.png", 7, "m.png", "a red circle", ""],
        ["b.png", 8, "", "", "True"],
        [str(pictures / "a.png"), 9, "", "a (blue:1.2) square", ""],
    ])
    rows = batch.read_manifest(manifest)
    out = tmp_path / "out"
    results = batch.run_manifest(rows, tiny_model(), out, values(prompt="flag prompt"))
    names = ["00000-a-7.png", "00001-b-8.png", "00002-a-9.png"]
    assert sorted(os.listdir(out)) == [*names, "results.csv"]
    assert capsys.readouterr().out.split() == [str(out / n) for n in names]
    table = read_table(out / "results.csv")
    assert list(table[0]) == list(batch.RESULT_COLUMNS)
    assert [(t["row"], t["path"], t["seed"], t["status"], t["error"]) for t in table] == [
        (str(i), str(out / n), str(7 + i), "written", "") for i, n in enumerate(names)]
    for t, r in zip(table, results):
        data = Path(t["path"]).read_bytes()
        assert t["sha256"] == hashlib.sha256(data).hexdigest() == r.sha256
        with Image.open(t["path"]) as im:
            assert im.text["parameters"] == t["infotext"] == r.infotext and im.size == (64, 64)
        assert float(t["seconds"]) > 0 and t["worker"].endswith(f":{os.getpid()}")
    # cells win over the run's values; empty cells keep them
    assert table[0]["infotext"].startswith("a red circle\n") and "Seed: 7" in table[0]["infotext"]
    assert table[1]["infotext"].startswith("flag prompt\n")
    assert table[2]["infotext"].startswith("a (blue:1.2) square\n")

    before = stamps(out / n for n in names)
    # A re-run finds every row done: nothing is loaded (this checkpoint does not exist), run or rewritten.
    again = batch.run_manifest(rows, batch.ModelSpec(tmp_path / "no-such.safetensors"), out, values())
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("skip: ") == 3
    assert stamps(out / n for n in names) == before
    assert [(r.path, r.sha256, r.infotext, r.seed, r.status) for r in again] == [
        (r.path, r.sha256, r.infotext, r.seed, "skipped") for r in results]
    # without the previous table, the finished files are read back
    (out / "results.csv").unlink()
    third = batch.run_manifest(rows, batch.ModelSpec(tmp_path / "no-such.safetensors"), out, values())
    assert [(r.sha256, r.infotext, r.seed) for r in third] == [(r.sha256, r.infotext, r.seed) for r in results]
    assert stamps(out / n for n in names) == before


def test_interrupted_run_resumes_the_rest(pictures, tmp_path, monkeypatch, capsys):
    """Killed while writing the second PNG: no half file, no temporary left, the table lists the finished row; the
    re-run makes the others and leaves the first untouched."""
    manifest = write_manifest(pictures / "m2.csv", ["image", "seed"], [["a.png", 1], ["b.png", 2], ["a.png", 3]])
    rows, out = batch.read_manifest(manifest), tmp_path / "out"
    real, calls = batch._png_writer, []

    def interrupted_second_write(data):
        calls.append(1)
        if len(calls) < 2:
            return real(data)

        def write(tmp):
            tmp.write_bytes(data[:20])
            raise KeyboardInterrupt
        return write

    monkeypatch.setattr(batch, "_png_writer", interrupted_second_write)
    with pytest.raises(KeyboardInterrupt):
        batch.run_manifest(rows, tiny_model(), out, values())
    assert sorted(os.listdir(out)) == ["00000-a-1.png", "results.csv"]
    assert [t["path"] for t in read_table(out / "results.csv")] == [str(out / "00000-a-1.png")]
    first = stamps([out / "00000-a-1.png"])
    monkeypatch.setattr(batch, "_png_writer", real)
    capsys.readouterr()

    results = batch.run_manifest(rows, tiny_model(), out, values())
    assert [r.status for r in results] == ["skipped", "written", "written"]
    assert capsys.readouterr().out.split() == [str(out / "00001-b-2.png"), str(out / "00002-a-3.png")]
    assert stamps([out / "00000-a-1.png"]) == first


def test_bad_rows_are_recorded_and_the_others_go_on(pictures, tmp_path, capsys):
    manifest = write_manifest(pictures / "m3.csv", ["image", "seed", "mask", "denoising_strength", "sampler_name",
                                                    "steps"], [
        ["a.png", 1, "", "", "", ""],                 # good
        ["missing.png", 2, "", "", "", ""],           # missing file
        ["garbage.png", 3, "", "", "", ""],           # not an image
        ["a.png", 4, "small.png", "", "", ""],        # mask of another size
        ["a.png", 5, "", "1.5", "", ""],              # out of range
        ["a.png", 6, "", "", "Nope", ""],             # unknown sampler
        ["a.png", "-1", "", "", "", ""],              # no explicit seed: no stable name
        ["a.png", "x", "", "", "", ""],               # not an integer
        ["", 9, "", "", "", ""],                      # no image
        ["b.png", 10, "", "", "", "2.5"],             # not an integer
        ["b.png", 11, "m.png", "", "", ""],           # good
    ])
    out = tmp_path / "out"
    results = batch.run_manifest(batch.read_manifest(manifest), tiny_model(), out, values())
    errors = {r.row: r.error for r in results if r.status == "error"}
    assert [r.row for r in results if r.status == "written"] == [0, 10]
    assert sorted(os.listdir(out)) == ["00000-a-1.png", "00010-b-11.png", "results.csv"]
    expected = {
        1: "row 1 image: cannot read image", 2: "row 2 image: cannot read image",
        3: "row 3 mask: size 32x32 differs from the init image's 64x64", 4: "row 4 denoising_strength: 1.5; must be in "
        "[0, 1]", 5: "row 5 sampler_name: 'Nope';", 6: "row 6 seed: '-1'; must be an integer in [0, 2**63)",
        7: "row 7 seed: 'x' is not a valid --seed", 8: "row 8 image: empty",
        9: "row 9 steps: '2.5' is not a valid --steps"}
    assert sorted(errors) == sorted(expected)
    for row, needle in expected.items():
        assert errors[row].startswith(needle), errors[row]
        assert "\n" not in errors[row]
    table = read_table(out / "results.csv")
    assert [t["row"] for t in table] == [str(i) for i in range(11)]
    assert {int(t["row"]): t["error"] for t in table if t["status"] == "error"} == errors
    err = capsys.readouterr().err
    assert all(f"error: {e}" in err for e in errors.values())

    # The bad rows are tried again by a re-run (they may have been fixed); the good ones are not.
    (pictures / "missing.png").write_bytes((pictures / "b.png").read_bytes())
    try:
        again = batch.run_manifest(batch.read_manifest(manifest), tiny_model(), out, values())
    finally:
        (pictures / "missing.png").unlink()
    assert [(r.row, r.status) for r in again if r.status != "error"] == [(0, "skipped"), (1, "written"),
                                                                         (10, "skipped")]


@pytest.mark.parametrize("header, rows, needle", [
    (["image", "prompt"], [["a.png", "x"]], "no 'seed' column"),
    (["seed"], [["1"]], "no 'image' column"),
    (["image", "seed", "denoising-strength"], [["a.png", 1, 0.5]], "unknown column 'denoising-strength'"),
    (["image", "seed", "seed"], [["a.png", 1, 2]], "column 'seed' appears twice"),
    (["image", "seed"], [["a.png", 1, "extra"]], "line 2: 3 cells, but the header has 2 columns"),
    (["image", "seed", "output"], [["a.png", 1, "x"], ["b.png", 2, "x"]], "output 'x' in rows 0 and 1"),
])
def test_manifest_problems_raise_before_anything_is_written(pictures, tmp_path, header, rows, needle):
    manifest = write_manifest(tmp_path / "bad.csv", header, rows)
    with pytest.raises(UsageError, match=needle):
        batch.read_manifest(manifest)
    with pytest.raises(UsageError, match="cannot read"):
        batch.read_manifest(tmp_path / "absent.csv")


def test_output_column_options_and_several_images_per_row(pictures, tmp_path):
    manifest = write_manifest(pictures / "m4.csv", ["image", "seed", "output", "batch_size", "mask_blur",
                                                    "CLIP_stop_at_last_layers", "mask"], [
        ["a.png", 20, "first", 2, 2, 2, "m.png"],
        ["b.png", 30, "", "", "", "", ""],
        ["b.png", 31, "../escape", "", "", "", ""],
    ])
    out = tmp_path / "out"
    results = batch.run_manifest(batch.read_manifest(manifest), tiny_model(), out, values(), results_name=None)
    assert sorted(os.listdir(out)) == ["00001-b-30.png", "first-0.png", "first-1.png"]
    assert [(r.row, Path(r.path).name, r.seed) for r in results[:2]] == [(0, "first-0.png", 20),
                                                                         (0, "first-1.png", 21)]
    assert all("Mask blur: 2" in r.infotext and "Clip skip: 2" in r.infotext for r in results[:2])
    assert results[3].error.startswith("row 2 output: '../escape'; must be a file name")


def test_parquet_manifest_reads_as_the_csv(pictures, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    header = ["image", "seed", "mask", "denoising_strength", "inpaint_full_res", "prompt"]
    rows = [["a.png", 1, "m.png", 0.25, True, "x, y"], ["b.png", 2, None, None, None, "z"]]
    csv_rows = [["" if v is None else v for v in r] for r in rows]
    from_csv = batch.read_manifest(write_manifest(pictures / "m5.csv", header, csv_rows))
    table = pa.table({h: [r[i] for r in rows] for i, h in enumerate(header)})
    pq.write_table(table, pictures / "m5.parquet")
    from_parquet = batch.read_manifest(pictures / "m5.parquet")
    assert from_parquet == from_csv
    jobs = [batch.prepare(r, values(), tmp_path) for r in from_parquet]
    assert jobs[0].values["denoising_strength"] == 0.25 and jobs[0].values["inpaint_full_res"] is True
    assert jobs[0].mask == pictures / "m.png" and jobs[1].mask is None and jobs[1].values["denoising_strength"] == 0.5


# -- the folder batch is a manifest ------------------------------------------------------------------------------------

@pytest.fixture
def folders(tmp_path, pictures):
    inputs, masks = tmp_path / "in", tmp_path / "masks"
    inputs.mkdir(), masks.mkdir()
    for name in ("a.png", "b.png"):
        (inputs / name).write_bytes((pictures / name).read_bytes())
    rect_mask((64, 64), (8, 8, 40, 40)).save(masks / "a.png")
    rect_mask((64, 64), (16, 8, 48, 40)).save(masks / "b.png")
    return inputs, masks


@pytest.mark.parametrize("extra", [[], ["--batch-size", "2"]])
def test_folder_manifest_writes_the_bytes_of_the_input_dir_batch(folders, tmp_path, monkeypatch, capsys, extra):
    inputs, masks = folders
    monkeypatch.setattr(commands, "_load_model", lambda *a, **k: tiny_model())
    flags = ["--steps", "4", "--denoising-strength", "0.5", "--seed", "5", "--sampler", "Euler a", *extra]
    code = main(["img2img", "--input-dir", str(inputs), "--mask-dir", str(masks), "--output-dir",
                 str(tmp_path / "cli"), *flags])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()

    args = build_parser().parse_args(["img2img", *flags])
    vals, _ = resolve_values(args, processing_flags())
    n = vals["batch_size"] * vals["n_iter"]
    rows = batch.manifest_from_folders(inputs, masks, tmp_path / "manifest", n)
    results = batch.run_manifest(rows, tiny_model(), tmp_path / "manifest", vals, strict=True, results_name=None)
    cli_files = sorted(p.name for p in (tmp_path / "cli").glob("*.png"))
    assert cli_files == sorted(os.listdir(tmp_path / "manifest"))
    assert cli_files == (["a.png", "b.png"] if not extra else ["a-0.png", "a-1.png", "b-0.png", "b-1.png"])
    for name in cli_files:
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "manifest" / name).read_bytes(), name
    assert capsys.readouterr().out.split() == [r.path for r in results]


@pytest.mark.parametrize("change, needle", [
    (lambda i, m: Image.new("RGB", (8, 8)).save(i / "c.png"), "--mask-dir: no mask for c.png"),
    (lambda i, m: ((i / "c.png").write_bytes(b"garbage"), (m / "c.png").write_bytes((m / "a.png").read_bytes())),
     "--input-dir c.png: cannot read image"),
    (lambda i, m: Image.new("L", (8, 8)).save(m / "a.png"), "--mask-dir a.png: size 8x8"),
])
def test_folder_manifest_strict_checks_everything_first(folders, tmp_path, change, needle):
    """As `sdcore img2img --input-dir`: the first problem of any row raises, before anything is written."""
    inputs, masks = folders
    change(inputs, masks)
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=needle):
        rows = batch.manifest_from_folders(inputs, masks, out, 1)
        batch.run_manifest(rows, tiny_model(), out, values(), strict=True)
    assert not out.exists()


def test_explain_prints_each_row_and_writes_nothing(folders, tmp_path, capsys):
    inputs, masks = folders
    out = tmp_path / "out"
    rows = batch.manifest_from_folders(inputs, None, out, 2)
    assert batch.run_manifest(rows, tiny_model(), out, values(batch_size=2), strict=True, explain=True) == []
    stdout = capsys.readouterr().out
    assert f"a.png -> {out / 'a-0.png'}, {out / 'a-1.png'}" in stdout and "t_enc" in stdout
    assert not out.exists()


# -- the command ---------------------------------------------------------------------------------------------------

def batch_command(*argv) -> int:
    ap = argparse.ArgumentParser(prog="sdcore")
    sub = ap.add_subparsers(dest="command", required=True)
    add_batch_parser(sub)
    return batch.run(ap.parse_args([str(a) for a in argv]))


def test_command_runs_a_manifest_and_exits_1_for_bad_rows(pictures, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(batch.ModelSpec, "load", lambda self: tiny_model())
    manifest = write_manifest(pictures / "m6.csv", ["image", "seed", "prompt"], [["a.png", 1, "x"], ["b.png", 2, ""]])
    out = tmp_path / "out"
    assert batch_command("batch", manifest, "--output-dir", out, "--steps", 4, "--denoising-strength", 0.5,
                         "--prompt", "from the flag", "--results", "table.csv") == 0
    table = read_table(out / "table.csv")
    assert [t["infotext"].split("\n")[0] for t in table] == ["x", "from the flag"]
    assert all("Steps: 4" in t["infotext"] for t in table)
    bad = write_manifest(pictures / "m7.csv", ["image", "seed"], [["a.png", 1], ["missing.png", 2]])
    assert batch_command("batch", bad, "--output-dir", out, "--steps", 4) == 1
    assert "1 of 2 rows failed (rows 1)" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--workers: 0"):
        batch_command("batch", bad, "--output-dir", out, "--workers", 0)
    with pytest.raises(UsageError, match="--ray-address: only with --engine ray"):
        batch_command("batch", bad, "--output-dir", out, "--ray-address", "auto")
    with pytest.raises(UsageError, match="--ckpt: cannot read"):
        batch_command("batch", bad, "--output-dir", out, "--ckpt", tmp_path / "none.safetensors")


def test_the_parser_needs_no_torch():
    """`sdcore --help` must not import torch: sdcore.batch and its parser import none of it."""
    code = ("import argparse, sys\nfrom sdcore import batch\nfrom sdcore.cli.flags import add_batch_parser\n"
            "add_batch_parser(argparse.ArgumentParser().add_subparsers())\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# -- Ray -------------------------------------------------------------------------------------------------------------
# Each Ray run costs the actors' start (a worker process importing torch and open_clip, then loading the checkpoint,
# 10-20 s on these 2 cores) besides `ray.init` (5-10 s): three actor starts in all.

RAY_ROWS = 8


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_manifest(tmp_path_factory, pictures):
    """8 rows of the tiny model at 64 px, and their outputs made by the local engine."""
    d = tmp_path_factory.mktemp("ray")
    rows = [[("a.png", "b.png")[i % 2], 100 + i, "m.png" if i % 3 == 0 else "", f"shape {i}"]
            for i in range(RAY_ROWS)]
    manifest = write_manifest(d / "manifest.csv", ["image", "seed", "mask", "prompt"], rows)
    for name in ("a.png", "b.png", "m.png"):
        (d / name).write_bytes((pictures / name).read_bytes())
    local = batch.run_manifest(batch.read_manifest(manifest), tiny_model(), d / "local", values(), echo=False)
    assert [r.status for r in local] == ["written"] * RAY_ROWS
    return manifest, {Path(r.path).name: Path(r.path).read_bytes() for r in local}


def run_ray(manifest: Path, out: Path, workers: int, rows_per_batch: int):
    options = batch.RayOptions(workers=workers, rows_per_batch=rows_per_batch, threads_per_worker=1)
    return batch.run_manifest(batch.read_manifest(manifest), batch.ModelSpec(TINY), out, values(),
                              engine="ray", ray_options=options, echo=False)


def assert_local_bytes(out: Path, local: dict[str, bytes]) -> None:
    # A process killed while writing may leave its hidden temporary (.<name>.<random>.partial); nothing reads it.
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == sorted([*local, "results.csv"])
    for name, data in local.items():
        assert (out / name).read_bytes() == data, name


@needs_ray
def test_ray_completes_a_stopped_run_without_redoing_and_writes_the_local_bytes(ray_cluster, ray_manifest,
                                                                               tmp_path):
    """A run stopped after 4 rows (here the manifest's first 4 rows made by the local engine: the same files a
    stopped run leaves), then the whole manifest on Ray (two actors, one row per map_batches call): the 4 finished
    rows are skipped and their files untouched (inode and mtime), the other 4 are made by the actors, and every PNG
    is the local engine's, byte for byte."""
    manifest, local = ray_manifest
    out = tmp_path / "out"
    first = batch.run_manifest(batch.read_manifest(manifest)[:4], tiny_model(), out, values(), echo=False)
    finished = stamps(Path(r.path) for r in first)
    assert len(finished) == 4

    results = run_ray(manifest, out, workers=2, rows_per_batch=1)
    assert [(r.row, r.status) for r in results] == [(i, "skipped" if i < 4 else "written") for i in range(RAY_ROWS)]
    assert_local_bytes(out, local)
    assert stamps(finished) == finished
    for r in results[4:]:
        assert r.sha256 == hashlib.sha256(local[Path(r.path).name]).hexdigest()
        assert r.worker and r.worker.split(":")[1] != str(os.getpid())  # written by an actor, not the driver
    assert [t["sha256"] for t in read_table(out / "results.csv")] == [r.sha256 for r in results]


def ray_actor_pids(class_part: str) -> list[int]:
    """Pids of this driver's live Ray actors whose class name contains `class_part` (Ray's actor table)."""
    from ray._private import state  # test-only: the actor table without the dashboard's state API

    return [a["Pid"] for a in state.actors().values() if class_part in a["ActorClassName"] and a["State"] == "ALIVE"]


@needs_ray
def test_ray_worker_killed_mid_run_is_replaced_and_finished_rows_are_kept(ray_cluster, ray_manifest, tmp_path):
    """One actor, 3 rows per map_batches call, SIGKILL of the actor once 2 PNGs exist: Ray starts a new actor and
    retries the killed call's rows; the rows already written are found and kept (inode and mtime), the run
    finishes with the local engine's bytes. (A driver stopped mid-run instead: the previous test.)"""
    manifest, local = ray_manifest
    out = tmp_path / "out"
    at_kill: dict[str, tuple[int, int]] = {}
    killed: list[int] = []

    def kill_after_two_rows():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if out.is_dir() and len(list(out.glob("*.png"))) >= 2:
                for pid in ray_actor_pids("RayRowWorker"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                at_kill.update(stamps(sorted(out.glob("*.png"))))
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_after_two_rows, daemon=True)
    watcher.start()
    try:
        results = run_ray(manifest, out, workers=1, rows_per_batch=3)
    finally:
        killed.append(0)  # stops the watcher if the run ended first
        watcher.join()
    assert killed[0] != 0 and 2 <= len(at_kill) < RAY_ROWS
    assert_local_bytes(out, local)
    assert stamps(at_kill) == at_kill
    # The killed call's rows were retried by the new actor: those it had written are found and kept (skipped).
    assert {r.status for r in results if r.path in at_kill} <= {"written", "skipped"}
    after = [r for r in results if r.path not in at_kill]
    assert {r.status for r in after} == {"written"}
    assert f"{socket.gethostname()}:{killed[0]}" not in {r.worker for r in after}  # made by the new actor
