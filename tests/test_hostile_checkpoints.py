"""Hostile and unusual checkpoint files (issue 11, items 6, 8, 9, 11): each failure is one line on stderr and exit
status 2 from `sdcore info` and `sdcore img2img`, naming the file, what it is and what is allowed; nothing in a file
is ever executed; `sdcore info` reads only the header.

Sources: safetensors format spec (8-byte little-endian header length, at most 100 MB of JSON header, then the
bytes it describes); A1111 `modules/safe.py` (restricted unpickler: tensors, storages, plain containers).
"""
from __future__ import annotations

import hashlib
import os
import struct
import sys
import types

import pytest
import torch
from make_checkpoint import make_state_dict, write_checkpoint
from PIL import Image
from safetensors.torch import save_file

from sdcore import cli
from sdcore import checkpoint as ck
from sdcore.checkpoint import CheckpointError, load_checkpoint, open_state_dict


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, out, err, *needles):
    assert code == 2, (code, out, err)
    assert err.startswith("sdcore: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and out == ""
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.fixture(scope="module")
def sd1_sd():
    return make_state_dict("sd1", "tiny", seed=0)


@pytest.fixture(scope="module")
def init_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "init.png"
    Image.new("RGB", (64, 64), (120, 60, 30)).save(path)
    return path


def both_commands(capsys, path, init_png, outdir):
    """`sdcore info PATH` and `sdcore img2img INIT --ckpt PATH`: (code, out, err) of each; img2img writes nothing."""
    results = [run(capsys, "info", path),
               run(capsys, "img2img", init_png, "--ckpt", path, "--outdir", outdir, "--steps", 1)]
    assert not outdir.exists()
    return results


# -- item 6: no VAE in the checkpoint ---------------------------------------------------------------------------

@pytest.mark.parametrize("drop, needles", [
    (("encoder.",), ["first_stage_model.encoder.*: missing ("]),
    (("decoder.",), ["first_stage_model.decoder.*: missing ("]),
    (("encoder.", "decoder.", "quant_conv.", "post_quant_conv."),
     ["first_stage_model.encoder.*: missing (", "first_stage_model.decoder.*: missing (",
      "first_stage_model.post_quant_conv.*: missing (2 keys)"]),
])
def test_checkpoint_without_vae_parts_names_them(capsys, tmp_path, sd1_sd, init_png, drop, needles):
    sd = {k: v for k, v in sd1_sd.items() if not k.startswith(tuple("first_stage_model." + d for d in drop))}
    path = tmp_path / "novae.safetensors"
    write_checkpoint(sd, path, metadata={})
    for code, out, err in both_commands(capsys, path, init_png, tmp_path / "out"):
        assert_one_line_error(code, out, err, str(path), "a separate VAE can be given with --vae", *needles)
    # the count is the number of tensors of that part in the family's VAE
    n_encoder = sum(k.startswith("first_stage_model.encoder.") for k in sd1_sd)
    if "encoder." in drop:
        assert f"first_stage_model.encoder.*: missing ({n_encoder} keys)" in err


def test_checkpoint_without_vae_works_with_a_separate_vae(capsys, tmp_path, sd1_sd, sd1_tiny_path):
    """What the message suggests works: the VAE from --vae completes the checkpoint (info and a real load)."""
    path, vae = tmp_path / "novae.safetensors", tmp_path / "vae.safetensors"
    write_checkpoint({k: v for k, v in sd1_sd.items() if not k.startswith("first_stage_model.")}, path, metadata={})
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in sd1_sd.items()
               if k.startswith("first_stage_model.") and ".loss." not in k}, vae)
    code, out, err = run(capsys, "info", path, "--vae", vae)
    assert code == 0, err
    assert "VAE: not complete in the file" in out and "VAE from the separate file vae.safetensors" in out
    loaded, reference = load_checkpoint(path, vae=vae), load_checkpoint(sd1_tiny_path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.vae.state_dict().values(),
                                                 reference.vae.state_dict().values()))


def test_vae_file_missing_a_part_is_named(capsys, tmp_path, sd1_sd, sd1_tiny_path):
    vae = tmp_path / "decoder-only.safetensors"
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in sd1_sd.items()
               if k.startswith("first_stage_model.decoder.")}, vae)
    code, out, err = run(capsys, "info", sd1_tiny_path, "--vae", vae)
    assert_one_line_error(code, out, err, "--vae", str(vae), "encoder.*: missing (", "quant_conv.*: missing (2 keys)")


def test_incomplete_unet_is_a_checkpoint_error_not_a_key_error(capsys, tmp_path, sd1_sd):
    path = tmp_path / "nounet-out.safetensors"
    write_checkpoint({k: v for k, v in sd1_sd.items() if k != "model.diffusion_model.out.2.weight"}, path,
                     metadata={})
    code, out, err = run(capsys, "info", path)
    assert_one_line_error(code, out, err, "UNet incomplete", "out.2.weight")


# -- item 8: legacy (non-zip) pickles, loaded through the restricted unpickler ----------------------------------

def save_legacy(obj, path):
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    with open(path, "rb") as f:
        assert f.read(4) != b"PK\x03\x04"  # not a zip: torch cannot mmap it


def test_legacy_pickle_loads_and_equals_the_zip_one(capsys, tmp_path, sd1_sd, sd1_tiny_ckpt_path):
    path = tmp_path / "legacy.ckpt"
    save_legacy({"state_dict": sd1_sd, "global_step": 470000, "epoch": 6}, path)
    legacy, zipped = load_checkpoint(path), load_checkpoint(sd1_tiny_ckpt_path)
    assert legacy.family == zipped.family and legacy.reasons == zipped.reasons
    for name, module in legacy.components().items():
        a, b = module.state_dict(), zipped.components()[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    raw = open_state_dict(path)
    assert raw.keys() == sd1_sd.keys() and all(torch.equal(raw[k], sd1_sd[k]) for k in raw)
    code, out, err = run(capsys, "info", path)
    assert code == 0 and "family: sd1" in out, err


class Payload:
    """Pickles as a call that would create `marker`."""

    def __init__(self, call, marker):
        self.call, self.marker = call, marker

    def __reduce__(self):
        if self.call == "system":
            return os.system, (f"touch {self.marker}",)
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("call, name", [("system", f"{os.system.__module__}.system"),  # posix.system
                                        ("open", f"{open.__module__}.open")])  # io.open
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_payload_is_refused_by_name_and_never_runs(capsys, tmp_path, init_png, call, name, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    obj = {"state_dict": {"x": torch.zeros(1), "y": Payload(call, marker)}}
    if legacy:
        save_legacy(obj, path)
    else:
        torch.save(obj, path)
    with pytest.raises(CheckpointError, match=f"global '{name}', which is not allowed"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=f"global '{name}'"):
        open_state_dict(path, meta=True)
    for code, out, err in both_commands(capsys, path, init_png, tmp_path / "out"):
        assert_one_line_error(code, out, err, str(path), f"global '{name}', which is not allowed",
                              "tensors, storages and plain containers")
    assert not marker.exists()


def test_lightning_trainer_state_is_read_without_lightning(tmp_path, sd1_sd, monkeypatch):
    """LDM-era .ckpt files keep Lightning's ModelCheckpoint class as a key of "callbacks": it resolves to an inert
    stand-in (A1111 modules/safe.py allows it by name); Lightning is not imported, the weights load."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
    obj = {"state_dict": sd1_sd, "pytorch-lightning_version": "1.4.2", "global_step": 470000,
           "callbacks": {ModelCheckpoint: {"best_model_score": None, "monitor": None}}}
    save_legacy(obj, tmp_path / "ldm-legacy.ckpt")
    torch.save(obj, tmp_path / "ldm-zip.ckpt")
    for name in names:
        monkeypatch.delitem(sys.modules, name)
    for path in (tmp_path / "ldm-legacy.ckpt", tmp_path / "ldm-zip.ckpt"):
        raw = open_state_dict(path)
        assert raw.keys() == sd1_sd.keys()
    assert "pytorch_lightning" not in sys.modules


# -- item 9: folders ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, needles", [
    ({"model_index.json": "{}", "unet/config.json": "{}", "vae/config.json": "{}"},
     ["is a folder", "single-file checkpoints (.safetensors, .ckpt)", "diffusers folder (model_index.json)",
      "convert it", "original single-file checkpoint"]),
    ({"unet/diffusion_pytorch_model.safetensors": ""}, ["is a folder", "diffusers folder (unet/ subfolder)"]),
    ({"notes.txt": "x"}, ["is a folder", "single-file checkpoints (.safetensors, .ckpt)"]),
    ({"a.safetensors": "x"}, ["is a folder", "checkpoint files in it: a.safetensors"]),
], ids=["diffusers", "unet-only", "plain", "with-files"])
def test_folder_as_checkpoint_says_what_it_is(capsys, tmp_path, init_png, layout, needles):
    folder = tmp_path / "model"
    for name, text in layout.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    results = both_commands(capsys, folder, init_png, tmp_path / "out")
    for code, out, err in results:
        assert_one_line_error(code, out, err, f"--ckpt: {folder} is a folder", *needles)
        assert "no such file" not in err
    code, out, err = run(capsys, "info", tmp_path / "missing.safetensors")
    assert_one_line_error(code, out, err, "no such file")


# -- item 11: info reads the header only; corrupt safetensors files ---------------------------------------------

def test_meta_load_reads_no_tensor_data_and_matches_a_real_load(monkeypatch, sd1_tiny_path, sd1_tiny):
    real_safe_open = ck.safe_open

    class HeaderOnly:
        def __init__(self, *args, **kwargs):
            self.f = real_safe_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def get_slice(self, key):
            return self.f.get_slice(key)

        def get_tensor(self, key):
            raise AssertionError(f"info read tensor data: {key}")

    monkeypatch.setattr(ck, "safe_open", HeaderOnly)
    meta = load_checkpoint(sd1_tiny_path, device="meta")
    assert all(p.is_meta for m in meta.components().values() for p in m.parameters())
    assert meta.family == sd1_tiny.family and meta.reasons == sd1_tiny.reasons
    assert meta.parameter_counts() == sd1_tiny.parameter_counts()
    assert meta.file_dtypes == sd1_tiny.file_dtypes
    assert meta.component_file_dtypes == sd1_tiny.component_file_dtypes
    assert set(meta.component_file_dtypes) == set(meta.components())
    assert meta.shorthash() == hashlib.sha256(sd1_tiny_path.read_bytes()).hexdigest()[:10]


def test_info_output_from_the_header(capsys, tmp_path, sd1_tiny_path, sd1_tiny_ckpt_path, sd1_tiny):
    code, out, err = run(capsys, "info", sd1_tiny_path)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"file: {sd1_tiny_path}" and lines[1].startswith("family: sd1 (prediction eps")
    for name, count in sd1_tiny.parameter_counts().items():
        assert f"{name}: {count:,} parameters, file dtype float32" in lines
    assert lines[-1] == f"model hash (sha256[:10]): {hashlib.sha256(sd1_tiny_path.read_bytes()).hexdigest()[:10]}"
    code, out_ckpt, err = run(capsys, "info", sd1_tiny_ckpt_path)  # a zip pickle: memory-mapped, same answer
    assert code == 0, err
    assert sorted(out_ckpt.splitlines()[1:-1]) == sorted(lines[1:-1])  # key order differs between formats
    half = tmp_path / "half.safetensors"
    write_checkpoint(make_state_dict("sd1", "tiny", seed=0, dtype=torch.float16), half, metadata={})
    code, out, err = run(capsys, "info", half)
    assert code == 0 and "unet: " in out and "parameters, file dtype float16" in out, err


def test_info_runs_the_sd2_probe_on_the_unet_alone(capsys, tmp_path):
    """SD2 with 4 channels: eps or v is not in the header; info reads the UNet to run A1111's probe, as a load does."""
    path = tmp_path / "sd2v.safetensors"
    write_checkpoint(make_state_dict("sd2-v", "tiny", seed=0), path, metadata={})
    code, out, err = run(capsys, "info", path)
    assert code == 0, err
    assert "family: sd2-v (prediction v" in out and "one-step probe" in out
    assert load_checkpoint(path, device="meta").family == load_checkpoint(path).family


def _header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


@pytest.fixture(scope="module")
def corrupt_files(tmp_path_factory, sd1_tiny_path):
    """A valid tiny checkpoint broken in the ways the safetensors format spec rules out, plus a truncated .ckpt."""
    d = tmp_path_factory.mktemp("corrupt")
    data = sd1_tiny_path.read_bytes()
    n = _header_length(data)
    files = {
        "truncated": data[: len(data) // 2],
        "truncated-header": data[: 8 + n // 2],
        "shorter-than-length": data[:5],
        "invalid-json": data[:8] + b"{" + b"x" * (n - 1) + data[8 + n:],
        "oversized-length": struct.pack("<Q", 10 ** 12) + data[8:],
        "empty": b"",
    }
    paths = {}
    for name, content in files.items():
        paths[name] = d / f"{name}.safetensors"
        paths[name].write_bytes(content)
    return paths


@pytest.mark.parametrize("name, reason", [
    ("truncated", "file not fully covered"), ("truncated-header", ""), ("shorter-than-length", ""),
    ("invalid-json", "invalid JSON"), ("oversized-length", "header too large"), ("empty", ""),
])
def test_corrupt_safetensors_is_one_line_exit_2(capsys, corrupt_files, init_png, tmp_path, name, reason):
    path = corrupt_files[name]
    for code, out, err in both_commands(capsys, path, init_png, tmp_path / "out"):
        assert_one_line_error(code, out, err, f"--ckpt: {path} is not a readable .safetensors file", reason,
                              "allowed: the safetensors layout")


def test_truncated_ckpt_is_one_line_exit_2(capsys, tmp_path, sd1_tiny_ckpt_path, init_png):
    data = sd1_tiny_ckpt_path.read_bytes()
    for label, content in (("zip", data[: len(data) // 2]), ("junk", b"not a pickle at all")):
        path = tmp_path / f"{label}.ckpt"
        path.write_bytes(content)
        for code, out, err in both_commands(capsys, path, init_png, tmp_path / "out"):
            assert_one_line_error(code, out, err, f"--ckpt: {path} is not a readable torch checkpoint",
                                  "allowed: a torch.save pickle")


# -- item 11: `sdcore info` reads the header without torch, in constant memory -----------------------------------

def _info_child(*argv):
    """`python -m sdcore info ...` in a fresh process: (exit code, stdout, whether torch got imported, peak RSS MiB)."""
    import json
    import subprocess

    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so it would count the forked pytest process
    code = ("import sys, json, contextlib, io\n"
            "sys.argv = ['sdcore', 'info', *sys.argv[1:]]\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    try:\n"
            "        from sdcore.cli import main; rc = main(sys.argv[1:])\n"
            "    except SystemExit as e: rc = e.code\n"
            "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
            "print(json.dumps([rc, buf.getvalue(), 'torch' in sys.modules, int(hwm.split()[1]) / 1024]))\n")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def _loaded_info(capsys, *argv):
    """The same command through the full meta-device load (what the fast path must agree with)."""
    from sdcore.cli.commands import loaded_info

    args = cli.build_parser().parse_args(["info", *map(str, argv)])
    assert loaded_info(args) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd1-inpaint"])
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_info_answers_from_the_header_without_torch_and_equals_the_full_load(capsys, tmp_path, family, fmt):
    path = tmp_path / f"m.{fmt}"
    write_checkpoint(make_state_dict(family, "tiny", seed=0, dtype=torch.float16), path, metadata={})
    rc, out, imported_torch, _ = _info_child(path)
    assert rc == 0 and not imported_torch, out
    assert out == _loaded_info(capsys, path)


def test_info_with_a_separate_vae_and_an_explicit_prediction_stays_torch_free(capsys, tmp_path, sd1_sd):
    path, vae = tmp_path / "novae.safetensors", tmp_path / "vae.safetensors"
    write_checkpoint({k: v for k, v in sd1_sd.items() if not k.startswith("first_stage_model.")}, path, metadata={})
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in sd1_sd.items()
               if k.startswith("first_stage_model.") and ".loss." not in k}, vae)
    rc, out, imported_torch, _ = _info_child(path, "--vae", vae)
    assert rc == 0 and not imported_torch and "VAE from the separate file vae.safetensors" in out
    assert out == _loaded_info(capsys, path, "--vae", vae)
    sd2 = tmp_path / "sd2.safetensors"
    write_checkpoint(make_state_dict("sd2-v", "tiny", seed=0), sd2, metadata={})
    rc, out, imported_torch, _ = _info_child(sd2, "--prediction", "v")
    assert rc == 0 and not imported_torch and "family: sd2-v (prediction v" in out
    assert out == _loaded_info(capsys, sd2, "--prediction", "v")


def _with_sparse_extra(src, dst, n_bytes):
    """`src`'s tensors plus a zero-filled float32 `model_ema.big` of `n_bytes` (a dropped extra: an EMA copy), written
    as a sparse file, so a multi-GB checkpoint costs no disk and no time to make."""
    import json

    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    header["model_ema.big"] = {"dtype": "F32", "shape": [n_bytes // 4], "data_offsets": [len(body),
                                                                                          len(body) + n_bytes]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + body)
        f.truncate(8 + len(text) + len(body) + n_bytes)


def test_info_peak_memory_does_not_grow_with_the_file(tmp_path, sd1_tiny_path):
    """Issue 11 item 11: a 2 GB checkpoint (more than 6 x the limit), and the whole `sdcore info` process stays under 300 MiB of RSS."""
    big = tmp_path / "big.safetensors"
    _with_sparse_extra(sd1_tiny_path, big, 2 << 30)
    assert big.stat().st_size > 2 << 30
    rc, out, imported_torch, peak_mib = _info_child(big)
    assert rc == 0 and not imported_torch, out
    n_ema = sum(k.startswith("model_ema.") for k in ck.open_state_dict(sd1_tiny_path, meta=True)) + 1
    assert f"dropped {n_ema} tensors: EMA copy of the UNet" in out
    assert peak_mib < 300, peak_mib
    h = hashlib.sha256()
    with open(big, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    assert out.splitlines()[-1] == f"model hash (sha256[:10]): {h.hexdigest()[:10]}"


def test_a_plain_pickle_dump_names_what_it_is_not(tmp_path):
    """torch's weights-only reader gives no reason for a plain pickle.dump file; the message still says one."""
    import pickle

    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match=r"is not a readable torch checkpoint \(UnpicklingError: not a "
                                              r"torch.save file\); allowed: a torch.save pickle"):
        open_state_dict(path)
