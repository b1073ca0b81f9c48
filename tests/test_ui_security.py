"""Safe by default: loopback-or-password binding, only the app's folders reachable, checked uploads."""

from __future__ import annotations

import http.client
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from ui_helpers import ui_app, ui_library  # noqa: F401  (fixtures)

from studio.cli import main
from studio.errors import StudioError
from studio.ui.launch import REPO
from studio.ui.security import AUTH_ENV, check_bind, check_upload, is_loopback, safe_filename

SECRET = "top-secret-neighbour"


def test_non_loopback_bind_without_auth_exits_with_one_error_line(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv(AUTH_ENV, raising=False)
    code = main(["ui", "--host", "0.0.0.0", "--adapters", str(tmp_path / "a"), "--outputs", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("error: refusing to serve on 0.0.0.0 without a password in studio ui: pass --auth USER:PASS")


def test_bind_rules():
    assert check_bind("127.0.0.1", None, {}) is None
    assert check_bind("0.0.0.0", "ann:pw", {}) == ("ann", "pw")
    assert check_bind("192.168.1.5", None, {AUTH_ENV: "bob:s3:cret"}) == ("bob", "s3:cret")
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.com"):
        with pytest.raises(StudioError, match="refusing to serve"):
            check_bind(host, None, {})
    with pytest.raises(StudioError, match="bad credentials in --auth"):
        check_bind("127.0.0.1", "nopassword", {})
    assert [is_loopback(h) for h in ("localhost", "127.0.0.2", "::1", "[::1]")] == [True] * 4


def _get(url: str, raw_path: str) -> tuple[int, bytes]:
    """GET exactly ``raw_path`` (no client-side normalisation of '..' or percent escapes)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.putrequest("GET", raw_path, skip_accept_encoding=True)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def test_only_the_app_folders_are_reachable(ui_app, ui_library):
    _, url, _ = ui_app
    adapters = ui_library["lora"].parent.resolve()
    secret = adapters.parent / "secret.txt"
    secret.write_text(SECRET)
    preview = adapters / "glow.preview.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(preview)
    status, _ = _get(url, f"/gradio_api/file={preview}")
    assert status == 200  # the control: a card preview is served
    a = str(adapters)
    attempts = [
        f"/gradio_api/file={a}/../secret.txt",
        f"/gradio_api/file={a}/%2e%2e/secret.txt",
        f"/gradio_api/file={a}/%2E%2E%2Fsecret.txt",
        f"/gradio_api/file={a}/%252e%252e/secret.txt",
        f"/gradio_api/file={a}/..%2fsecret.txt",
        f"/gradio_api/file={secret}",
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file=..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/gradio_api/file=%2fetc%2fpasswd",
        f"/gradio_api/file={REPO}/pyproject.toml",
        f"/gradio_api/file={REPO}/sample_data/mini-sd/model_index.json",
        f"/gradio_api/file={REPO}/.git/config",
        "/file=/etc/passwd",
    ]
    for path in attempts:
        status, body = _get(url, path)
        assert status in (403, 404), (path, status)
        assert SECRET.encode() not in body and b"root:" not in body and b"[build-system]" not in body, path


def test_uploads_are_checked(ui_app, ui_library, tmp_path):
    _, _, client = ui_app
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(AppError, match="Invalid file type"):  # Gradio checks file_types on the server...
        client.predict(handle_file(str(text)), api_name="/upload_adapter")
    with pytest.raises(StudioError, match="upload notes.txt refused: only .safetensors files are accepted"):
        ui_app[0].studio_service.add_adapter(text)  # ...and so do we, whatever the component says
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x00" * 64)
    with pytest.raises(AppError, match="fake.safetensors"):
        client.predict(handle_file(str(fake)), api_name="/upload_adapter")
    good = tmp_path / "../good copy!.safetensors"
    good.write_bytes(ui_library["lora"].read_bytes())
    cards, *_ = client.predict(handle_file(str(good)), api_name="/upload_adapter")
    assert any(c["caption"].startswith("uploads/good_copy · lora") for c in cards)
    assert (ui_library["lora"].parent / "uploads" / "good_copy.safetensors").is_file()


def test_upload_and_name_helpers(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\x00" * 2048)
    with pytest.raises(StudioError, match="over the"):
        check_upload(big, (".png",), max_bytes=1024)
    with pytest.raises(StudioError, match="only .png files"):
        check_upload(tmp_path / "x.PNG.exe", (".png",))
    assert safe_filename("../../etc/passwd", ".safetensors") == "passwd.safetensors"
    assert safe_filename("..\\..\\win\\x y.safetensors", ".safetensors") == "x_y.safetensors"
    with pytest.raises(StudioError, match="bad file name"):
        safe_filename("...", ".png")


def test_auth_is_required_when_set(ui_library, tmp_path):
    from studio.ui.launch import start

    demo, url = start(ui_library["lora"].parent, tmp_path / "out", auth="ann:pw", port=None,
                      prevent_thread_lock=True)
    try:
        status, _ = _get(url, "/config")
        assert status == 401
        from gradio_client import Client

        Client(url, auth=("ann", "pw"), verbose=False)  # the right password gets in
        with pytest.raises(Exception):
            Client(url, auth=("ann", "wrong"), verbose=False)
    finally:
        demo.close()
