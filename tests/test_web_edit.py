"""The playground's Edit mode in headless Chromium (as tests/test_web.py drives the page): images
by drag-and-drop and by file choice, a brush-painted mask on the first image, progress, the
result in the same gallery, and a server without an edit model."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from qwen_image_server.api.app import create_app, real_engine_factory
from tests.conftest import LiveServer, tiny_settings
from tests.fakes import FakeEngine
from tests.test_web import SLOW, Watched, screenshot, wait_for_image


@pytest.fixture(scope="module")
def live(tmp_path_factory, small_working_size) -> Iterator[LiveServer]:
    settings = tiny_settings(tmp_path_factory.mktemp("web-edit"))
    server = LiveServer(create_app(settings, engine_factory=real_engine_factory(settings))).start()
    yield server
    server.stop()


def png(seed: int, size=(96, 64)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def drop_file(page, selector: str, name: str, data: bytes) -> None:
    """Drop a file on an element the way a browser does: a drop event with a DataTransfer."""
    page.evaluate(
        """([selector, name, bytes]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([new Uint8Array(bytes)], name, {type: "image/png"}));
            const target = document.querySelector(selector);
            target.dispatchEvent(new DragEvent("dragover", {dataTransfer: transfer, bubbles: true, cancelable: true}));
            target.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        }""",
        [selector, name, list(data)],
    )


# In the page: every multipart body fetch() sends is recorded as [name, base64 content] pairs.
RECORD_FORMS = """
(() => {
    const sent = window.__sentForms = [];
    const fetch = window.fetch;
    window.fetch = async (url, options = {}) => {
        if (options.body instanceof FormData) {
            const parts = [];
            for (const [name, value] of options.body.entries()) {
                const bytes = value instanceof Blob ? new Uint8Array(await value.arrayBuffer())
                                                    : new TextEncoder().encode(value);
                parts.push([name, btoa(Array.from(bytes, (b) => String.fromCharCode(b)).join(""))]);
            }
            sent.push({url: String(url), parts});
        }
        return fetch(url, options);
    };
})();
"""


def sent_edits(page) -> list[tuple[list[bytes], bytes | None]]:
    """(images, mask) of every edit the page has sent, as uploaded."""
    edits = []
    for form in page.evaluate("window.__sentForms"):
        if not form["url"].endswith("v1/jobs/edit"):  # as the page writes it, relative
            continue
        parts = [(name, base64.b64decode(data)) for name, data in form["parts"]]
        images = [data for name, data in parts if name in ("image", "image[]")]
        edits.append((images, next((data for name, data in parts if name == "mask"), None)))
    return edits


def test_edit_with_dropped_images_and_a_painted_mask(browser, live):
    watched = Watched(browser, live.url, viewport={"width": 1280, "height": 900})
    page = watched.page
    page.add_init_script(RECORD_FORMS)  # what the page uploads, seen from the page
    page.goto(live.url + "/")
    page.click("label[for='mode-edit']")
    expect(page.locator("#mode-edit")).to_be_checked()
    expect(page.locator("#generate")).to_have_text("Edit")
    expect(page.locator("#aspect_ratio")).to_be_hidden()  # the first image sets the size

    # No image yet: said next to the drop zone, nothing is sent.
    page.fill("#prompt", "make it night")
    page.fill("#num_inference_steps", "2")
    page.click("#generate")
    expect(page.locator("#image-error")).to_contain_text("Add the image to edit first")
    assert not sent_edits(page)

    # Two images (one dropped, one chosen): no mask editor, both uploaded.
    drop_file(page, "#drop-zone", "first.png", png(1))
    page.set_input_files("#image", files=[{"name": "second.png", "mimeType": "image/png", "buffer": png(2)}])
    expect(page.locator("#edit-images li")).to_have_count(2)
    expect(page.locator("#mask-editor")).to_be_hidden()
    page.click("#generate")
    wait_for_image(page)
    assert page.eval_on_selector("#result-image", "i => i.naturalWidth") == 384  # 96x64 snapped
    assert page.eval_on_selector("#result-image", "i => i.naturalHeight") == 256
    expect(page.locator("#result-meta")).to_contain_text("Edit · 384 × 256")
    images, mask = sent_edits(page)[-1]
    assert images == [png(1), png(2)] and mask is None  # dropped first, chosen second

    # One image, a stroke of the brush: the mask goes along, transparent where painted.
    page.click("#edit-images li:nth-child(2) button")
    expect(page.locator("#edit-images li")).to_have_count(1)
    expect(page.locator("#mask-editor")).to_be_visible()
    page.wait_for_function("() => document.getElementById('mask').width === 96")
    box = page.locator("#mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    screenshot(page, "web-playground-edit-mask.png")
    page.click("#generate")
    expect(page.locator("#gallery li")).to_have_count(2, timeout=SLOW)
    wait_for_image(page)
    images, upload = sent_edits(page)[-1]
    assert len(images) == 1 and upload is not None
    mask = Image.open(io.BytesIO(upload)).convert("RGBA")
    alpha = np.asarray(mask.getchannel("A"))
    assert mask.size == (96, 64) and alpha[32, 48] == 0 and alpha[2, 2] == 255  # painted: change
    screenshot(page, "web-playground-edit.png")
    watched.close()


def test_edit_mode_is_off_without_an_edit_model(browser, tmp_path):
    server = LiveServer(create_app(tiny_settings(tmp_path, model="painter=tiny"),
                                   engine_factory=lambda: FakeEngine())).start()
    try:
        watched = Watched(browser, server.url)
        watched.page.goto(server.url + "/")
        expect(watched.page.locator("#mode-edit")).to_be_disabled()
        expect(watched.page.locator("#mode-help")).to_be_visible()
        watched.close()
    finally:
        server.stop()
