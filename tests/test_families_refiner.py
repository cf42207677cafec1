"""SDXL refiner switching (A1111 v1.10 `apply_refiner`): refiner_checkpoint / refiner_switch_at."""
import pytest
from make_checkpoint import make_state_dict, write_checkpoint
from PIL import Image

from sdcore import StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img, load_checkpoint, process_images


@pytest.fixture(scope="module")
def xl_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("xl")
    paths = {}
    for fam in ("sdxl", "sdxl-refiner"):
        paths[fam] = d / f"{fam}.safetensors"
        write_checkpoint(make_state_dict(fam, "tiny", seed=3), paths[fam], metadata={})
    return load_checkpoint(paths["sdxl"]), paths["sdxl-refiner"]


def test_refiner_takes_over_after_the_switch_point(xl_pair, monkeypatch):
    base, refiner_path = xl_pair
    refiner = load_checkpoint(refiner_path)
    who = []
    for name, sd in (("base", base), ("refiner", refiner)):
        original = sd.apply_model
        monkeypatch.setattr(sd, "apply_model", lambda *a, _o=original, _n=name, **k: (who.append(_n), _o(*a, **k))[1])
    # Euler, 6 uniform steps: sigmas at t = 999, 799.2, 599.4, 399.6, 199.8, 0 -> completed ratios 0, .2, .4, .6,
    # .8, 1.0; with switch_at 0.5 calls 0-2 use the base, calls 3-5 the refiner.
    p = StableDiffusionProcessingTxt2Img(sd_model=base, prompt="a cat", sampler_name="Euler", scheduler="uniform",
                                         steps=6, seed=1, width=64, height=64, refiner_checkpoint=refiner,
                                         refiner_switch_at=0.5)
    processed = process_images(p)
    assert who == ["base"] * 3 + ["refiner"] * 3
    assert f"Refiner: {refiner.name} [{refiner.shorthash()}], Refiner switch at: 0.5" in processed.info
    assert p.sd_model is base and f"Model: {base.name}," in processed.info


def test_refiner_by_path_and_bad_switch(xl_pair, astronaut):
    base, refiner_path = xl_pair
    photo = astronaut.resize((64, 64), Image.LANCZOS)
    kw = dict(sd_model=base, prompt="a cat", init_images=[photo], steps=4, seed=1, width=64, height=64)
    processed = process_images(StableDiffusionProcessingImg2Img(refiner_checkpoint=str(refiner_path),
                                                                refiner_switch_at=0.8, **kw))
    assert "Refiner switch at: 0.8" in processed.info
    with pytest.raises(ValueError, match="refiner_switch_at"):
        process_images(StableDiffusionProcessingImg2Img(refiner_checkpoint=str(refiner_path), **kw))
