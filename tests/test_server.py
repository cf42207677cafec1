"""`sdcore serve`: A1111's /sdapi/v1/txt2img and /sdapi/v1/img2img over the bundled tiny model (sdcore/server.py).

Round trips give the bytes and infotext of `process_images` run directly on the same job; bad values are a 422 whose
loc names the field; a body with every field of A1111's StableDiffusionImg2ImgProcessingAPI at its default is
accepted; two concurrent requests both succeed and never run the model at the same time.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="fastapi's TestClient needs httpx (the test extra)")

from fastapi.testclient import TestClient  # noqa: E402

from sdcore.cli.flags import add_serve_parser  # noqa: E402
from sdcore import server  # noqa: E402
from sdcore.cli.flags import DEFAULT_CKPT  # noqa: E402
from sdcore.processing import (StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img,  # noqa: E402
                               process_images)

ROOT = Path(__file__).resolve().parent.parent
TINY = DEFAULT_CKPT  # the bundled tiny model (package data, sdcore/weights/)
SIZE = {"width": 64, "height": 64}

# What `Processed.js()` writes (A1111 modules/processing.py, v1.10.1).
A1111_INFO_KEYS = {
    "prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
    "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
    "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash",
    "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "extra_generation_params",
    "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip", "is_using_inpainting_conditioning",
    "version"}


@pytest.fixture(scope="module")
def tiny():
    from sdcore import load_checkpoint

    return load_checkpoint(TINY)


@pytest.fixture(scope="module")
def client(tiny):
    return TestClient(server.create_app(tiny))


@pytest.fixture(scope="module")
def photo(astronaut) -> Image.Image:
    return astronaut.resize((64, 64), Image.LANCZOS)


def b64(image: Image.Image, data_url: bool = False) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    text = base64.b64encode(buf.getvalue()).decode("ascii")
    return "data:image/png;base64," + text if data_url else text


def decode(text: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(text)))
    im.load()
    return im


def square_mask(lo: int = 16, hi: int = 48) -> Image.Image:
    mask = np.zeros((64, 64), np.uint8)
    mask[lo:hi, lo:hi] = 255
    return Image.fromarray(mask)


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def assert_same_as_direct(body: dict, direct) -> None:
    """The response's images and infotexts are exactly what process_images gave for the same job."""
    info = json.loads(body["info"])
    assert info["infotexts"] == direct.infotexts
    assert info["all_seeds"] == direct.seeds
    assert len(body["images"]) == len(direct.images)
    for text, image, infotext in zip(body["images"], direct.images, direct.infotexts):
        got = decode(text)
        assert got.format == "PNG" and got.size == image.size == (64, 64) and got.mode == image.mode
        assert got.tobytes() == image.tobytes()
        assert got.info["parameters"] == infotext


# ---------------------------------------------------------------------------------------------------------------
# Round trips


def test_img2img_round_trip_equals_process_images(client, tiny, photo):
    request = {"init_images": [b64(photo, data_url=True)], "prompt": "a red circle", "negative_prompt": "blurry",
               "seed": 1234, "steps": 4, "cfg_scale": 6.5, "denoising_strength": 0.5, "sampler_name": "Euler a",
               **SIZE}
    body = ok(client.post("/sdapi/v1/img2img", json=request))
    direct = process_images(StableDiffusionProcessingImg2Img(
        sd_model=tiny, init_images=[photo], prompt="a red circle", negative_prompt="blurry", seed=1234, steps=4,
        cfg_scale=6.5, denoising_strength=0.5, sampler_name="Euler a", **SIZE), disable_progress=True)
    assert_same_as_direct(body, direct)
    info = json.loads(body["info"])
    assert A1111_INFO_KEYS <= set(info)
    assert info["prompt"] == "a red circle" and info["negative_prompt"] == "blurry" and info["seed"] == 1234
    assert info["sampler_name"] == "Euler a" and info["denoising_strength"] == 0.5 and info["steps"] == 4
    assert info["sd_model_name"] == "sdcore-tiny" and info["sd_model_hash"] == tiny.shorthash()
    assert info["extra_generation_params"]["Denoising strength"] == 0.5
    # parameters: every request field with A1111's API defaults filled in; the images are not echoed
    params = body["parameters"]
    assert params["init_images"] is None and params["mask"] is None
    assert params["prompt"] == "a red circle" and params["sampler_index"] == "Euler"
    assert params["restore_faces"] is None and params["script_args"] == [] and params["send_images"] is True
    assert set(params) == {f.name for f in server.api_fields("img2img")}


def test_txt2img_round_trip_equals_process_images(client, tiny):
    request = {"prompt": "a blue square", "seed": 7, "steps": 3, "batch_size": 2, "sampler_name": "DPM++ 2M",
               "scheduler": "karras", **SIZE}
    body = ok(client.post("/sdapi/v1/txt2img", json=request))
    direct = process_images(StableDiffusionProcessingTxt2Img(
        sd_model=tiny, prompt="a blue square", seed=7, steps=3, batch_size=2, sampler_name="DPM++ 2M",
        scheduler="karras", **SIZE), disable_progress=True)
    assert_same_as_direct(body, direct)
    info = json.loads(body["info"])
    assert info["all_seeds"] == [7, 8] and info["batch_size"] == 2 and "Schedule type: Karras" in info["infotexts"][0]
    assert body["parameters"]["enable_hr"] is False and body["parameters"]["denoising_strength"] is None


def test_a1111_default_sampler_is_sampler_index_euler(client, tiny):
    """A1111's API runs `sampler_name or sampler_index`, and sampler_index defaults to "Euler"."""
    info = json.loads(ok(client.post("/sdapi/v1/txt2img", json={"seed": 3, "steps": 2, **SIZE}))["info"])
    assert info["sampler_name"] == "Euler" and "Sampler: Euler," in info["infotexts"][0]
    info = json.loads(ok(client.post("/sdapi/v1/txt2img", json={"seed": 3, "steps": 2, "sampler_index": "LMS",
                                                                "sampler_name": None, **SIZE}))["info"])
    assert info["sampler_name"] == "LMS"


def test_inpainting_with_mask(client, tiny, photo):
    mask = square_mask()
    request = {"init_images": [b64(photo)], "mask": b64(mask, data_url=True), "prompt": "a red circle",
               "seed": 99, "steps": 3, "denoising_strength": 0.9, "sampler_name": "Euler a", "mask_blur": 0,
               "inpainting_fill": 1, "inpaint_full_res": False, **SIZE}
    body = ok(client.post("/sdapi/v1/img2img", json=request))
    direct = process_images(StableDiffusionProcessingImg2Img(
        sd_model=tiny, init_images=[photo], mask=mask, prompt="a red circle", seed=99, steps=3,
        denoising_strength=0.9, sampler_name="Euler a", mask_blur=0, inpainting_fill=1, inpaint_full_res=False,
        **SIZE), disable_progress=True)
    assert_same_as_direct(body, direct)
    out = np.asarray(decode(body["images"][0]).convert("RGB"))
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], np.asarray(photo)[keep])  # the overlay: unmasked pixels are the input's
    assert not np.array_equal(out[~keep], np.asarray(photo)[~keep])


def test_send_images_false_and_include_init_images(client, photo):
    mask = square_mask()
    request = {"init_images": [b64(photo)], "mask": b64(mask), "seed": 5, "steps": 2, "send_images": False,
               "include_init_images": True, **SIZE}
    body = ok(client.post("/sdapi/v1/img2img", json=request))
    assert body["images"] == [] and len(json.loads(body["info"])["infotexts"]) == 1
    assert body["parameters"]["init_images"] == request["init_images"]
    assert body["parameters"]["mask"] == request["mask"]


def test_infotext_field_fills_the_fields_not_set(client, photo):
    """A1111 `apply_infotext`: the infotext's values apply where the request is silent; given fields win."""
    first = json.loads(ok(client.post("/sdapi/v1/img2img", json={
        "init_images": [b64(photo)], "seed": 4321, "steps": 3, "cfg_scale": 5.0, "sampler_name": "Heun",
        "denoising_strength": 0.4, **SIZE}))["info"])
    again = ok(client.post("/sdapi/v1/img2img", json={"init_images": [b64(photo)], "infotext": first["infotexts"][0],
                                                       "steps": 2}))
    info = json.loads(again["info"])
    assert (info["seed"], info["sampler_name"], info["cfg_scale"], info["steps"]) == (4321, "Heun", 5.0, 2)
    assert (info["width"], info["height"], info["denoising_strength"]) == (64, 64, 0.4)
    assert again["parameters"]["seed"] == 4321 and again["parameters"]["steps"] == 2
    bad = client.post("/sdapi/v1/img2img", json={"init_images": [b64(photo)], "infotext": "just a prompt"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "infotext"]


def test_override_settings_are_options(client, photo):
    body = ok(client.post("/sdapi/v1/txt2img", json={
        "seed": 11, "steps": 2, "override_settings": {"CLIP_stop_at_last_layers": 2, "randn_source": "NV",
                                                      "sd_model_checkpoint": "sdcore-tiny"}, **SIZE}))
    text = json.loads(body["info"])["infotexts"][0]
    assert "Clip skip: 2" in text and "RNG: NV" in text
    assert json.loads(body["info"])["clip_skip"] == 2


def test_save_images_writes_pngs_under_outdir(tiny, tmp_path):
    client = TestClient(server.create_app(tiny, outdir=tmp_path))
    body = ok(client.post("/sdapi/v1/txt2img", json={"seed": 21, "steps": 2, "save_images": True, **SIZE}))
    files = list((tmp_path / "txt2img-images").rglob("*.png"))
    assert len(files) == 1 and files[0].name.endswith("-21.png")
    assert Image.open(files[0]).info["parameters"] == json.loads(body["info"])["infotexts"][0]


# ---------------------------------------------------------------------------------------------------------------
# A1111's documented request body (StableDiffusionImg2ImgProcessingAPI, its /docs schema, at the defaults)


def a1111_img2img_body(photo) -> dict:
    """Every field of A1111 v1.10.1's img2img request model at its default value (restore_faces, tiling: false
    rather than null, as clients send them), then the few a test sets."""
    return {
        "prompt": "a red circle", "negative_prompt": "", "styles": [], "seed": 77, "subseed": -1,
        "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": "Euler",
        "scheduler": "Automatic", "batch_size": 1, "n_iter": 1, "steps": 3, "cfg_scale": 7, "width": 64, "height": 64,
        "restore_faces": False, "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False,
        "eta": None, "denoising_strength": 0.75, "s_min_uncond": None, "s_churn": None, "s_tmax": None,
        "s_tmin": None, "s_noise": None, "override_settings": {}, "override_settings_restore_afterwards": True,
        "refiner_checkpoint": None, "refiner_switch_at": None, "disable_extra_networks": False,
        "firstpass_image": None, "comments": {}, "init_images": [b64(photo)], "resize_mode": 0,
        "image_cfg_scale": None, "mask": None, "mask_blur_x": 4, "mask_blur_y": 4, "mask_blur": None,
        "mask_round": True, "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0,
        "inpainting_mask_invert": 0, "initial_noise_multiplier": None, "latent_mask": None, "force_task_id": None,
        "sampler_index": "Euler", "include_init_images": False, "script_name": None, "script_args": [],
        "send_images": True, "save_images": False, "alwayson_scripts": {}, "infotext": None,
    }


def a1111_txt2img_body() -> dict:
    """Every field of A1111 v1.10.1's txt2img request model at its default value."""
    return {
        "prompt": "a red circle", "negative_prompt": "", "styles": [], "seed": 78, "subseed": -1,
        "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None,
        "scheduler": None, "batch_size": 1, "n_iter": 1, "steps": 2, "cfg_scale": 7, "width": 64, "height": 64,
        "restore_faces": False, "tiling": False, "do_not_save_samples": False, "do_not_save_grid": False,
        "eta": None, "denoising_strength": None, "s_min_uncond": None, "s_churn": None, "s_tmax": None,
        "s_tmin": None, "s_noise": None, "override_settings": {}, "override_settings_restore_afterwards": True,
        "refiner_checkpoint": None, "refiner_switch_at": None, "disable_extra_networks": False,
        "firstpass_image": None, "comments": {}, "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0,
        "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0,
        "hr_checkpoint_name": None, "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "",
        "hr_negative_prompt": "", "force_task_id": None, "sampler_index": "Euler", "script_name": None,
        "script_args": [], "send_images": True, "save_images": False, "alwayson_scripts": {}, "infotext": None,
    }


def test_a1111_documented_bodies_are_accepted(client, tiny, photo):
    body = ok(client.post("/sdapi/v1/img2img", json=a1111_img2img_body(photo)))
    direct = process_images(StableDiffusionProcessingImg2Img(
        sd_model=tiny, init_images=[photo], prompt="a red circle", seed=77, steps=3, sampler_name="Euler",
        scheduler="Automatic", **SIZE), disable_progress=True)
    assert_same_as_direct(body, direct)
    assert set(a1111_img2img_body(photo)) | {"mask_blend"} == set(body["parameters"])
    body = ok(client.post("/sdapi/v1/txt2img", json=a1111_txt2img_body()))
    assert len(body["images"]) == 1 and set(a1111_txt2img_body()) == set(body["parameters"])
    assert {f.name for f in server.api_fields("txt2img")} == set(a1111_txt2img_body())


# ---------------------------------------------------------------------------------------------------------------
# 422 naming the field


def detail(response) -> dict:
    assert response.status_code == 422, response.text
    return response.json()["detail"][0]


@pytest.mark.parametrize("change, loc", [
    # fields A1111 has that sdcore cannot honour: accepted at their default only
    ({"restore_faces": True}, ["restore_faces"]),
    ({"tiling": True}, ["tiling"]),
    ({"styles": ["cinematic"]}, ["styles"]),
    ({"script_name": "x/y/z plot"}, ["script_name"]),
    ({"script_args": [1, 2]}, ["script_args"]),
    ({"alwayson_scripts": {"ControlNet": {"args": []}}}, ["alwayson_scripts"]),
    ({"firstpass_image": "abc"}, ["firstpass_image"]),
    ({"refiner_checkpoint": "/etc/sd_xl_refiner_1.0.safetensors"}, ["refiner_checkpoint"]),
    ({"override_settings_restore_afterwards": False}, ["override_settings_restore_afterwards"]),
    ({"disable_extra_networks": True}, ["disable_extra_networks"]),
    ({"save_images": True}, ["save_images"]),  # the server was started without an outdir
    # values out of range or unknown
    ({"denoising_strength": 2}, ["denoising_strength"]),
    ({"sampler_name": "Euler z"}, ["sampler_name"]),
    ({"sampler_name": None, "sampler_index": "nope"}, ["sampler_index"]),
    ({"scheduler": "fastest"}, ["scheduler"]),
    ({"width": 65}, ["width"]),
    ({"steps": 0}, ["steps"]),
    ({"steps": "many"}, ["steps"]),  # pydantic
    ({"batch_size": 1.5}, ["batch_size"]),  # pydantic
    ({"inpainting_fill": 5}, ["inpainting_fill"]),
    ({"resize_mode": 7}, ["resize_mode"]),
    ({"mask_blur": -1}, ["mask_blur"]),
    ({"subseed_strength": 1.5}, ["subseed_strength"]),
    ({"mask_blend": "mix"}, ["mask_blend"]),
    ({"no_such_field": 1}, ["no_such_field"]),  # A1111 ignores unknown fields; sdcore names them
    ({"override_settings": {"no_such_option": 1}}, ["override_settings", "no_such_option"]),
    ({"override_settings": {"CLIP_stop_at_last_layers": "two"}}, ["override_settings", "CLIP_stop_at_last_layers"]),
    ({"override_settings": {"randn_source": "TPU"}}, ["override_settings", "randn_source"]),
    ({"override_settings": {"sd_model_checkpoint": "v1-5-pruned-emaonly"}}, ["override_settings",
                                                                             "sd_model_checkpoint"]),
    ({"override_settings": {"sd_vae": "vae-ft-mse-840000.safetensors"}}, ["override_settings", "sd_vae"]),
    # images
    ({"init_images": None}, ["init_images"]),
    ({"init_images": []}, ["init_images"]),
    ({"init_images": ["%%% not base64 %%%"]}, ["init_images", 0]),
    ({"init_images": [base64.b64encode(b"not an image").decode()]}, ["init_images", 0]),
    ({"init_images": ["https://example.com/cat.png"]}, ["init_images", 0]),
    ({"mask": "data:image/png;base64,AAAA"}, ["mask"]),
    ({"latent_mask": "AAAA"}, ["latent_mask"]),
])
def test_img2img_bad_value_is_422_naming_the_field(client, photo, change, loc):
    """From A1111's default body, one field set to what sdcore cannot do: 422, loc naming it; the model never runs."""
    error = detail(client.post("/sdapi/v1/img2img", json={**a1111_img2img_body(photo), **change}))
    assert error["loc"] == ["body", *loc]
    assert str(loc[-1]) in error["msg"] or error["type"] != "value_error"


@pytest.mark.parametrize("change, loc", [
    ({"firstphase_width": 256}, ["firstphase_width"]),
    ({"hr_checkpoint_name": "other.safetensors"}, ["hr_checkpoint_name"]),
    ({"enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, ["hr_upscaler"]),
    ({"enable_hr": True, "hr_sampler_name": "nope"}, ["hr_sampler_name"]),
    ({"enable_hr": True, "denoising_strength": -0.5}, ["denoising_strength"]),
    ({"init_images": [""]}, ["init_images"]),  # not a txt2img field
    ({"infotext": "a cat\nSteps: x, Sampler: Euler, Seed: 1"}, ["infotext"]),
])
def test_txt2img_bad_value_is_422_naming_the_field(client, change, loc):
    error = detail(client.post("/sdapi/v1/txt2img", json={**a1111_txt2img_body(), **change}))
    assert error["loc"] == ["body", *loc]


def test_mask_size_and_nan_are_422(client, photo):
    error = detail(client.post("/sdapi/v1/img2img", json={**a1111_img2img_body(photo),
                                                          "mask": b64(Image.new("L", (32, 32), 255))}))
    assert error["loc"] == ["body", "mask"] and "size" in error["msg"]
    body = json.dumps(a1111_txt2img_body()).replace('"cfg_scale": 7', '"cfg_scale": NaN')
    error = detail(client.post("/sdapi/v1/txt2img", content=body, headers={"content-type": "application/json"}))
    assert error["loc"] == ["body", "cfg_scale"]


def test_ignore_unknown_fields_as_a1111(tiny):
    client = TestClient(server.create_app(tiny, ignore_unknown_fields=True))
    body = ok(client.post("/sdapi/v1/txt2img", json={**a1111_txt2img_body(), "clip_skip": 2, "hr_foo": 1}))
    assert "clip_skip" not in body["parameters"] and len(body["images"]) == 1


# ---------------------------------------------------------------------------------------------------------------
# The queue


def test_two_concurrent_requests_never_overlap(client, tiny, monkeypatch, photo):
    """Two requests sent at once both succeed; their jobs run one after the other on the single worker thread, and
    no two UNet calls are ever in flight together."""
    lock = threading.Lock()
    active, max_active, jobs, ready = [0], [0], [], []
    unet_forward = tiny.unet.forward

    def counted_forward(*args, **kwargs):
        with lock:
            active[0] += 1
            max_active[0] = max(max_active[0], active[0])
        try:
            time.sleep(0.01)
            return unet_forward(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    real_process, real_prepare = server.process_images, server.prepare

    def timed_process(p, **kwargs):
        start = time.monotonic()
        try:
            time.sleep(0.3)  # widen the window in which an unqueued second job would overlap
            return real_process(p, **kwargs)
        finally:
            jobs.append((start, time.monotonic(), threading.current_thread().name, p.prompt))

    def timed_prepare(*args, **kwargs):
        job = real_prepare(*args, **kwargs)
        ready.append((time.monotonic(), job.p.prompt))
        return job

    monkeypatch.setattr(tiny.unet, "forward", counted_forward)
    monkeypatch.setattr(server, "process_images", timed_process)
    monkeypatch.setattr(server, "prepare", timed_prepare)
    barrier, responses = threading.Barrier(2), {}

    def post(name: str, path: str, body: dict):
        barrier.wait()
        responses[name] = client.post(path, json=body)

    threads = [threading.Thread(target=post, args=("a", "/sdapi/v1/txt2img", {"prompt": "a", "seed": 1, "steps": 3,
                                                                              **SIZE})),
               threading.Thread(target=post, args=("b", "/sdapi/v1/img2img", {"prompt": "b", "seed": 2, "steps": 4,
                                                                              "init_images": [b64(photo)], **SIZE}))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert {name: r.status_code for name, r in responses.items()} == {"a": 200, "b": 200}
    assert len(jobs) == 2 and max_active[0] == 1
    (s1, e1, thread1, first), (s2, e2, thread2, _) = sorted(jobs)
    assert e1 <= s2, "the second job started before the first ended"
    assert thread1 == thread2 and thread1.startswith("sdcore-model")
    # the later job was already checked and waiting while the first one ran: it was queued, not merely late
    assert max(t for t, _ in ready) < e1
    for name, r in responses.items():
        assert json.loads(r.json()["info"])["prompt"] == name


# ---------------------------------------------------------------------------------------------------------------
# Listing endpoints and the command line


def test_listing_endpoints(client, tiny):
    samplers = ok(client.get("/sdapi/v1/samplers"))
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in samplers}
    assert {"karras", "automatic"} <= {s["name"] for s in ok(client.get("/sdapi/v1/schedulers"))}
    (model,) = ok(client.get("/sdapi/v1/sd-models"))
    assert model["model_name"] == "sdcore-tiny" and model["hash"] == tiny.shorthash()
    schema = ok(client.get("/openapi.json"))
    assert "/sdapi/v1/img2img" in schema["paths"] and "/sdapi/v1/txt2img" in schema["paths"]


def test_cli_parser_and_run(monkeypatch, tiny, tmp_path):
    parser = argparse.ArgumentParser(prog="sdcore")
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve"])
    assert (args.host, args.port, args.device, args.dtype, args.outdir) == ("127.0.0.1", 7860, "cpu", "float32", None)
    args = parser.parse_args(["serve", "--ckpt", str(TINY), "--port", "7861", "--outdir", str(tmp_path)])
    calls = []
    monkeypatch.setattr(server, "load_checkpoint", lambda *a, **k: calls.append((a, k)) or tiny)
    monkeypatch.setattr(server.uvicorn, "run", lambda app, **k: calls.append((app, k)))
    assert server.run(args) == 0
    (load_args, load_kwargs), (app, run_kwargs) = calls
    assert load_args == (TINY,) and load_kwargs["device"] == "cpu"
    assert run_kwargs == {"host": "127.0.0.1", "port": 7861} and app.state.outdir == tmp_path
    assert server.run(parser.parse_args(["serve", "--port", "70000"])) == 2
