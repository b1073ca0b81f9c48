"""Datasets: every image kind users have, damaged files named, captions, buckets, batch order."""

import numpy as np
import pytest
from PIL import Image

from studio.errors import StudioError
from trainers import batches, data_images


def _save(path, array, mode=None, **kw):
    Image.fromarray(array, mode).save(path, **kw) if mode else Image.fromarray(array).save(path, **kw)


def test_every_image_kind_loads_as_rgb(tmp_path):
    red = np.zeros((20, 30, 3), np.uint8)
    red[..., 0] = 200
    Image.fromarray(red).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(red).convert("L").save(tmp_path / "grey.png")
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0], rgba[:, :15, 3] = 200, 255  # right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray((np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)).save(tmp_path / "deep.png")
    exif = Image.fromarray(red)
    info = exif.getexif()
    info[0x0112] = 6  # rotated 90 degrees: width and height swap on load
    exif.save(tmp_path / "rotated.jpg", exif=info, quality=100)
    cmyk = data_images.load_image(tmp_path / "cmyk.jpg")
    assert cmyk.shape == (20, 30, 3) and abs(int(cmyk[..., 0].mean()) - 200) < 8 and cmyk[..., 1].mean() < 10
    assert data_images.load_image(tmp_path / "grey.png").shape == (20, 30, 3)
    rgba_loaded = data_images.load_image(tmp_path / "rgba.png")
    assert tuple(rgba_loaded[0, 0]) == (200, 0, 0) and tuple(rgba_loaded[0, 29]) == (255, 255, 255)
    deep = data_images.load_image(tmp_path / "deep.png")
    assert deep.dtype == np.uint8 and deep.max() > 200 and deep.min() == 0
    assert data_images.load_image(tmp_path / "rotated.jpg").shape == (30, 20, 3)


@pytest.mark.parametrize("content, message", [
    (b"", "is an empty file"),
    (b"hello, I am text", "is not an image"),
    (None, "is damaged"),
])
def test_bad_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.png"
    if content is None:
        _save(path, np.full((64, 64, 3), 90, np.uint8))
        path.write_bytes(path.read_bytes()[:-60])  # truncated
    else:
        path.write_bytes(content)
    with pytest.raises(StudioError, match=f"{path}.*{message}|{message}"):
        data_images.load_image(path)


def test_scan_captions_kohya_folders_and_non_utf8(tmp_path):
    _save(tmp_path / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "a.txt").write_text("a red circle, zxq style")
    sub = tmp_path / "3_kbot robot"
    sub.mkdir()
    _save(sub / "b.png", np.zeros((8, 8, 3), np.uint8))
    _save(sub / "c.png", np.zeros((8, 8, 3), np.uint8))
    (sub / "c.txt").write_bytes("caf\xe9 robot".encode("latin-1"))
    with pytest.warns(UserWarning, match="not UTF-8"):
        items = data_images.scan(tmp_path)
    by_name = {i.path.name: i for i in items}
    assert by_name["a.png"].caption == "a red circle, zxq style" and by_name["a.png"].repeats == 1
    assert by_name["b.png"].caption == "kbot robot" and by_name["b.png"].repeats == 3
    assert by_name["c.png"].caption == "caf\ufffd robot"


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(StudioError, match="does not exist"):
        data_images.scan(tmp_path / "nope")
    with pytest.raises(StudioError, match="no images in"):
        data_images.scan(tmp_path)


def test_trigger_and_caption_augmentation():
    import random
    assert data_images.with_trigger("a red circle", "zxq") == "zxq, a red circle"
    assert data_images.with_trigger("a zxq circle", "zxq") == "a zxq circle"
    rng = random.Random(0)
    shuffled = {data_images.augment_caption("zxq, a, b, c, d", rng, True, 1, 0.0) for _ in range(20)}
    assert all(s.startswith("zxq, ") for s in shuffled) and len(shuffled) > 3
    assert data_images.augment_caption("zxq", random.Random(0), False, 1, 0.999) == ""


def test_buckets_and_fitting():
    buckets = batches.make_buckets(64, 16, 32, 128)
    assert (64, 64) in buckets and all(w % 16 == 0 and h % 16 == 0 for w, h in buckets)
    assert batches.nearest_bucket(200, 100, buckets)[0] > batches.nearest_bucket(200, 100, buckets)[1]
    fitted = batches.fit_to_bucket(np.zeros((50, 120, 3), np.uint8), (96, 48))
    assert fitted.shape == (48, 96, 3)


def test_batch_order_is_a_function_of_seed_and_epoch_and_always_full():
    order = batches.BatchOrder([0, 0, 0, 1, 1], [1, 2, 1, 1, 1], batch_size=2, seed=3)
    again = batches.BatchOrder([0, 0, 0, 1, 1], [1, 2, 1, 1, 1], batch_size=2, seed=3)
    assert [order.batch(s) for s in range(10)] == [again.batch(s) for s in range(10)]
    assert all(len(order.batch(s)) == 2 for s in range(10))
    for s in range(10):  # one bucket per batch
        assert len({[0, 0, 0, 1, 1][i] for i in order.batch(s)}) == 1
    first_epoch = [i for b in order.epoch(0) for i in b]
    assert sorted(set(first_epoch)) == [0, 1, 2, 3, 4] and first_epoch.count(1) >= 2  # repeats honoured


def test_check_reports_problems(tmp_path):
    _save(tmp_path / "a.png", np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "a.txt").write_text("fine")
    _save(tmp_path / "b.png", np.zeros((64, 64, 3), np.uint8))  # duplicate of a, no caption
    _save(tmp_path / "small.png", np.ones((16, 16, 3), np.uint8))
    (tmp_path / "small.txt").write_text("")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    report = data_images.check(tmp_path, min_size=32)
    assert report.images == 4 and report.captions == 2
    assert len(report.missing) == 2 and len(report.empty) == 1 and len(report.unreadable) == 1
    assert len(report.too_small) == 1 and len(report.duplicates) == 1
    text = data_images.format_report(report, tmp_path)
    assert "duplicate images" in text and "problem(s)" in text
