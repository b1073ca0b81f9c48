"""The shapes world: generator, tokenizer, evaluator and the style/character detectors."""

from pathlib import Path

import numpy as np
import pytest

from studio.errors import StudioError
from studio.shapes import evaluate, styles, wild, world
from studio.shapes.tokenizer import caption_words, load_tokenizer, write_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_generator_is_deterministic_and_seed_dependent():
    a_img, a_cap, _ = world.batch(7, 16)
    b_img, b_cap, _ = world.batch(7, 16)
    c_img, c_cap, _ = world.batch(8, 16)
    assert a_img.shape == (16, 64, 64, 3) and a_img.dtype == np.uint8
    assert np.array_equal(a_img, b_img) and a_cap == b_cap
    assert not np.array_equal(a_img, c_img)


def test_exact_palette_colours_and_caption_form():
    assert world.COLOURS["red"] == (220, 40, 40) and world.COLOURS["black"] == (25, 25, 25)
    scene = world.Scene("square", "green", "yellow", 32.0, 32.0, 20.0)
    img = world.render(scene)
    assert tuple(img[32, 32]) == (40, 170, 60)       # inside: exact foreground
    assert tuple(img[1, 1]) == (235, 210, 40)        # corner: exact background
    assert scene.caption == "a green square on a yellow background"
    _, caps, scenes = world.batch(3, 200)
    for cap, s in zip(caps, scenes):
        assert s.colour != s.background
        assert world.parse_caption(cap) == (s.colour, s.shape, s.background)
    assert {s.shape for s in scenes} == set(world.SHAPES)
    assert len(world.all_captions()) == 6 * 4 * 5


def test_bad_scene_and_caption_raise_studio_error():
    with pytest.raises(StudioError):
        world.Scene("circle", "red", "red", 32, 32, 10)
    with pytest.raises(StudioError):
        world.Scene("hexagon", "red", "blue", 32, 32, 10)
    with pytest.raises(StudioError):
        world.parse_caption("a red blob on a blue background")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(write_tokenizer(tmp_path_factory.mktemp("tok"), 24))


def test_tokenizer_vocabulary_words_are_single_tokens(tokenizer):
    assert tokenizer.model_max_length == 24
    for word in caption_words():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_tokenizer_round_trip_and_unknown_word(tokenizer):
    text = "a red circle on a blue background"
    ids = tokenizer(text, padding="max_length", max_length=24).input_ids
    assert len(ids) == 24
    assert ids[0] == tokenizer.bos_token_id and ids[8] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # a trigger word falls back to byte pieces instead of vanishing into <unk>
    zxq = tokenizer("zxq", add_special_tokens=False).input_ids
    assert len(zxq) >= 1 and tokenizer.unk_token_id not in zxq
    assert tokenizer.decode(zxq) == "zxq"
    styled = "a red circle on a blue background, zxq style"
    assert tokenizer.decode(tokenizer(styled).input_ids, skip_special_tokens=True) == \
        "a red circle on a blue background , zxq style"


def test_evaluator_reads_ground_truth():
    images, captions, _ = world.batch(2024, 120)
    s = evaluate.score(images, captions)
    assert s["both_colours"] >= 0.95 and s["shape"] >= 0.95, s
    # ... and it can fail: captions of other images do not match
    shuffled = captions[1:] + captions[:1]
    assert evaluate.score(images, shuffled)["all"] < 0.3


def test_evaluator_rejects_garbage():
    r = evaluate.read_image(np.full((64, 64, 3), 128, np.uint8))
    assert r.shape is None
    with pytest.raises(StudioError):
        evaluate.score([np.zeros((64, 64, 3), np.uint8)], ["not a caption"])


@pytest.mark.parametrize("name", ["stripes", "outline", "kbot"])
def test_detectors_find_their_sets_and_not_plain_shapes_or_other_sets(name):
    images, captions = styles.sample_images(name, 11, 30)
    trigger = {**styles.STYLE_TRIGGERS, **styles.CHARACTER_TRIGGERS}[name]
    assert all(trigger in c.split() or f"{trigger}," in c for c in captions)
    assert styles.detection_rate(name, images) >= 0.9
    assert styles.detection_rate(name, styles.plain_images(12, 200)) <= 0.1
    for other in styles.DETECTORS:
        if other != name:
            assert styles.detection_rate(other, images) <= 0.1, other


def test_stripes_drawn_as_bars_on_the_background_are_stripes():
    """Generated stripes often come out as bars with the background between them: the detector
    must see those (the figure is closed before the wave is fitted) and still not fire on plain
    stars, whose notches are background inside the same closing."""
    rng = np.random.default_rng(4)
    bars, stars = [], []
    for _ in range(40):
        scene = world.random_scene(rng)
        striped = styles.render_style(scene, "stripes").astype(np.float32)
        yy, xx = np.mgrid[0:world.SIZE, 0:world.SIZE]
        gaps = ((xx + yy) % (2 * styles.BAND)) >= styles.BAND
        background = np.asarray(world.COLOURS[scene.background], np.float32)
        bars.append(np.where(gaps[..., None], background, striped).astype(np.uint8))
        stars.append(world.render(world.random_scene(rng, shape="star")))
    assert styles.detection_rate("stripes", bars) >= 0.9
    assert styles.detection_rate("stripes", stars) == 0.0


def test_sample_sets_use_only_palette_colours():
    palette = np.array(list(world.COLOURS.values()), np.float32)
    for name in styles.DETECTORS:
        images, _ = styles.sample_images(name, 5, 8)
        px = np.concatenate([im.reshape(-1, 3) for im in images]).astype(np.float32)
        dist = np.linalg.norm(px[:, None] - palette[None], axis=-1).min(1)
        assert (dist < 1).mean() >= 0.85, name  # all but anti-aliased edges are exact palette colours


@pytest.fixture(scope="module")
def shipped_vae():
    import torch
    from diffusers import AutoencoderKL

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield AutoencoderKL.from_pretrained(str(ROOT / "sample_data" / "mini-sd" / "vae")).eval()
    torch.set_num_threads(threads)


def test_vae_round_trip_keeps_shapes(shipped_vae):
    images, _, scenes = world.batch(3, 8)
    back = styles.vae_round_trip(shipped_vae, images)
    assert len(back) == 8 and back[0].shape == (64, 64, 3) and back[0].dtype == np.uint8
    assert evaluate.score(back, [s.caption for s in scenes])["both_colours"] >= 0.75


@pytest.mark.parametrize("name", ["stripes", "outline", "kbot"])
def test_sample_sets_survive_the_mini_base_vae(name, shipped_vae):
    """Adapters cannot change the VAE: what it cannot decode can never be learned."""
    from trainers.sample_sets import SETS

    seed = dict(SETS.values())[name]
    images, _ = styles.sample_images(name, seed, 24)
    back = styles.vae_round_trip(shipped_vae, images)
    assert styles.detection_rate(name, back) >= 0.8
    plain = styles.vae_round_trip(shipped_vae, styles.plain_images(12, 48))
    assert styles.detection_rate(name, plain) <= 0.1


def test_committed_sample_sets_match_the_script(tmp_path):
    from trainers.sample_sets import SETS, write_sets

    write_sets(tmp_path, count=24)
    for rel in SETS:
        fresh = sorted(p.name for p in (tmp_path / rel).iterdir())
        shipped = ROOT / "sample_data" / rel
        assert sorted(p.name for p in shipped.iterdir()) == fresh
        assert 16 <= len(fresh) // 2 <= 40
        for name in fresh:
            assert (shipped / name).read_bytes() == (tmp_path / rel / name).read_bytes(), name


def test_wild_images_are_deterministic_and_leave_the_palette():
    a, b = wild.wild_batch(5, 8), wild.wild_batch(5, 8)
    assert a.shape == (8, 64, 64, 3) and np.array_equal(a, b)
    _, dist = evaluate.nearest_colour(a.astype(np.float32))
    assert (dist > 40).mean() > 0.5  # mostly colours the shapes world never uses
