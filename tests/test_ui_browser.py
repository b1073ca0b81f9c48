"""A real browser: Playwright drives headless Chromium (Debian's ``chromium``) through the Generate tab.

Skips when Chromium or the Python ``playwright`` package is missing (CI without a browser).
Set ``STUDIO_UI_SCREENSHOT=path.png`` to keep a screenshot of the Generate tab (the README's).
"""

from __future__ import annotations

import os
import re
import shutil

import pytest
from ui_helpers import PROMPT, ui_app, ui_library  # noqa: F401  (fixtures)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page(request):
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    _, url, _ = request.getfixturevalue("ui_app")  # only now: a skip costs no app launch
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(url)
        yield page
        browser.close()


def _card(page, name: str):
    return page.locator("#library button.thumbnail-item").filter(has_text=name).first


def _add(page, name: str) -> None:
    _card(page, name).click()
    page.wait_for_function(f"document.querySelector('#pick input').value === {name!r}")
    page.locator("#add").click()


def test_add_two_adapters_move_a_slider_generate(page):
    from playwright.sync_api import expect

    page.locator("#prompt textarea").fill(PROMPT)
    _add(page, "stripy")
    expect(page.locator("#slot0_key input")).to_have_value("stripy")
    _add(page, "glow")
    expect(page.locator("#slot1_key input")).to_have_value("glow")
    # trigger words went into the prompt, each once
    expect(page.locator("#prompt textarea")).to_have_value(f"glowing, stripy, {PROMPT}")
    page.locator("#slot1_weight input[type=range]").fill("0.35")  # move the slider itself
    expect(page.locator("#slot1_weight input[type=number]")).to_have_value("0.35")
    steps = page.locator("#steps input[type=number]")
    steps.fill("6")
    steps.press("Enter")
    page.locator("#generate").click()
    expect(page.locator("#output_gallery img").first).to_be_visible()
    parameters = page.locator("#parameters textarea")
    expect(parameters).to_have_value(re.compile(r'Steps: 6, .*Lora weights: "stripy: 1, glow: 0.35"'))
    shot = os.environ.get("STUDIO_UI_SCREENSHOT")
    if shot:
        page.screenshot(path=shot, full_page=True)


def test_errors_show_as_a_message_not_a_trace(page):
    from playwright.sync_api import expect

    _card(page, "broken").click()
    page.locator("#add").click()
    toast = page.locator(".toast-body").filter(has_text="cannot be used").first
    expect(toast).to_be_visible()
    expect(toast).to_contain_text("adapter broken cannot be used: broken.safetensors is not a .safetensors file")
    assert "Traceback" not in page.content()
