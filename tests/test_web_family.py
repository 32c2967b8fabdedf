"""The playground's model-family tasks in headless Chromium (as tests/test_web.py drives the page):
image-to-image and inpainting from an uploaded picture, a ControlNet's control image, and a
picture split into RGBA layers by the layered model, shown side by side and stacked; the API's
400s shown on the field they name; and a server without a ControlNet or a layered model.

One server for the module: the tiny model (with its embedded ControlNet), its edit model and the
tiny layered model, whose resolution bucket is shrunk to 128 pixels as tests/test_layered.py does."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import Page, expect

from tests.conftest import LiveServer, hold_engine, tiny_settings
from tests.fakes import FakeEngine
from tests.test_web import SLOW, Watched, screenshot, wait_for_image

pytestmark = pytest.mark.xdist_group("web_family")
SIZE = 512  # the s1:1 preset the page starts with


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveServer]:
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_layered as pipeline_module

    from qwen_image_server.serving import specs

    real_pipeline, real_server = pipeline_module.calculate_dimensions, specs.layered_size
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_module, "calculate_dimensions", lambda area, ratio: real_pipeline(128 * 128, ratio))
        patch.setattr(specs, "layered_size", lambda size, resolution: real_server(size, 128))
        server = LiveServer(tiny_settings(tmp_path_factory.mktemp("web-family"), model="tiny,tiny-layered")).start()
        yield server
        server.stop()


def png(seed: int, size=(SIZE, SIZE), mode: str = "RGB") -> bytes:
    """A picture of coloured blocks (smooth enough that the VAE keeps something of it)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size[1] // 32 + 1, size[0] // 32 + 1, len(mode)), dtype=np.uint8)
    pixels = blocks.repeat(32, 0).repeat(32, 1)[: size[1], : size[0]]
    if mode == "RGBA":
        pixels[..., 3] = 255
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, "PNG")
    return buf.getvalue()


def edges(size=(SIZE, SIZE)) -> bytes:
    """A control image as a client makes one: white edges on black."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    pixels[size[1] // 4, :] = pixels[:, size[0] // 3] = pixels[size[1] * 3 // 4, :] = 255
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def file(name: str, data: bytes) -> dict:
    return {"name": name, "mimeType": "image/png", "buffer": data}


# In the page: every JSON body fetch() sends to the jobs route, as sent.
RECORD_JOBS = """
(() => {
    const sent = window.__sentJobs = [];
    const fetch = window.fetch;
    window.fetch = (url, options = {}) => {
        if (String(url).endsWith("v1/jobs") && typeof options.body === "string") sent.push(JSON.parse(options.body));
        return fetch(url, options);
    };
})();
"""


def last_job(page: Page) -> dict:
    return page.evaluate("window.__sentJobs.at(-1)")


def download(page: Page, link: str) -> bytes:
    """What clicking a download link of the page saves (the page's blob, as the user gets it)."""
    with page.expect_download() as started:
        page.click(link)
    return Path(started.value.path()).read_bytes()


def result(page: Page) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(download(page, "#result-download"))).convert("RGB")).astype(int)


def generate(page: Page, count: int) -> None:
    """Press Generate and wait for the result: the count-th image of this page's gallery."""
    page.click("#generate")
    expect(page.locator("#gallery li")).to_have_count(count, timeout=SLOW)
    wait_for_image(page)


def open_page(browser, live) -> Watched:
    watched = Watched(browser, live.url, viewport={"width": 1280, "height": 1000})
    watched.page.add_init_script(RECORD_JOBS)
    watched.page.goto(live.url + "/")
    expect(watched.page.locator("#server-info")).to_contain_text("tiny on cpu")
    watched.page.fill("#prompt", "a house by a lake")
    watched.page.fill("#num_inference_steps", "4")
    watched.page.uncheck("#add_overlay")  # the picture's own pixels, to compare
    return watched


def assert_repainted_inside_the_mask(page, sent: dict, picture: bytes, label: str, what: str) -> np.ndarray:
    """The painted mask went out (transparent where painted), and the result kept `picture` pixel
    for pixel outside it and changed inside it; returns the picture's pixels."""
    alpha = np.asarray(Image.open(io.BytesIO(base64.b64decode(sent["mask"]))).getchannel("A"))
    assert alpha.shape == (SIZE, SIZE) and alpha[SIZE // 2, SIZE // 2] == 0 and alpha[10, 10] == 255
    expect(page.locator("#result-meta")).to_contain_text(label)
    inpainted = result(page)
    original = np.asarray(Image.open(io.BytesIO(picture)).convert("RGB")).astype(int)
    kept = alpha == 255
    assert (inpainted[kept] == original[kept]).all(), f"outside the mask the {what} must stay as it was"
    assert np.abs(inpainted[~kept] - original[~kept]).mean() > 1, "the masked area was not repainted"
    return original


def test_image_to_image_and_inpainting_from_an_uploaded_picture(browser, live):
    watched = open_page(browser, live)
    page = watched.page
    picture = png(1)
    page.click("#start-fields summary")
    page.set_input_files("#start_image", files=[file("start.png", picture)])
    expect(page.locator("#start-picked")).to_be_visible()
    expect(page.locator("#strength-value")).to_have_text("0.60")  # the API's default

    page.fill("#strength", "0.3")
    expect(page.locator("#strength-value")).to_have_text("0.30")
    generate(page, 1)
    sent = last_job(page)
    assert base64.b64decode(sent["image"]) == picture and sent["strength"] == 0.3 and "mask" not in sent
    expect(page.locator("#result-meta")).to_contain_text("Image-to-image · 512 × 512")
    gentle = result(page)

    page.fill("#strength", "0.9")
    generate(page, 2)
    assert last_job(page)["strength"] == 0.9
    strong = result(page)
    assert np.abs(gentle - strong).mean() > 1, "the strength changed nothing"

    # A stroke of the brush on the picture: inpainting, the rest of the picture kept exactly.
    page.wait_for_function(f"() => document.getElementById('start-mask').width === {SIZE}")
    box = page.locator("#start-mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    generate(page, 3)
    sent = last_job(page)
    original = assert_repainted_inside_the_mask(page, sent, picture, "Inpainting", "picture")
    screenshot(page, "web-family-inpaint.png")

    # An uploaded mask replaces the painted one: here the picture's top half is repainted.
    upload = np.full((SIZE, SIZE, 4), 255, dtype=np.uint8)
    upload[: SIZE // 2, :, 3] = 0
    buf = io.BytesIO()
    Image.fromarray(upload, "RGBA").save(buf, "PNG")
    page.set_input_files("#start_mask", files=[file("mask.png", buf.getvalue())])
    generate(page, 4)
    assert base64.b64decode(last_job(page)["mask"]) == buf.getvalue()
    bottom = result(page)[SIZE // 2:]
    assert (bottom == original[SIZE // 2:]).all(), "outside the uploaded mask the picture must stay as it was"

    # The picture removed: a plain text-to-image request again.
    page.click("#start-remove")
    expect(page.locator("#start-picked")).to_be_hidden()
    generate(page, 5)
    assert "image" not in last_job(page) and "strength" not in last_job(page)
    watched.close()


def test_controlnet_controls_steer_the_image_and_its_errors_show_on_their_fields(browser, live):
    watched = open_page(browser, live)
    page = watched.page
    expect(page.locator("#control-fields")).to_be_visible()  # the tiny model has a ControlNet
    expect(page.locator("#controlnet-names")).to_have_text("(tiny-controlnet, tiny-controlnet-inpaint)")
    generate(page, 1)
    plain = result(page)

    page.click("#control-fields summary")
    page.select_option("#aspect_ratio", "16:9")
    page.set_input_files("#control_image", files=[file("edges.png", edges())])
    # The control image must have the output's size: the page picks the preset of that size.
    expect(page.locator("#control_image-help")).to_contain_text("s1:1")
    expect(page.locator("#aspect_ratio")).to_have_value("s1:1")
    page.fill("#controlnet_conditioning_scale", "9")  # out of range: the API's 400 names the field
    page.click("#generate")
    expect(page.locator("#controlnet_conditioning_scale-error")).to_be_visible()
    expect(page.locator("#controlnet_conditioning_scale-error")).to_contain_text("ControlNet scale")
    expect(page.locator("#controlnet_conditioning_scale")).to_have_attribute("aria-invalid", "true")

    page.fill("#controlnet_conditioning_scale", "2.5")
    page.fill("#control_guidance_end", "0.75")
    generate(page, 2)
    sent = last_job(page)
    assert base64.b64decode(sent["control_image"]) == edges()
    assert (sent["controlnet_conditioning_scale"], sent["control_guidance_start"], sent["control_guidance_end"]) \
        == (2.5, 0.0, 0.75)
    expect(page.locator("#result-meta")).to_contain_text("ControlNet · 512 × 512")
    assert np.abs(result(page) - plain).mean() > 1, "the control image changed nothing"
    screenshot(page, "web-family-controlnet.png")

    # A control image of another size: the page says so, and shows the server's 400 on the field.
    page.set_input_files("#control_image", files=[file("small.png", edges((96, 64)))])
    expect(page.locator("#control_image-help")).to_contain_text("96 × 64: no aspect ratio")
    page.click("#generate")
    expect(page.locator("#control_image-error")).to_be_visible()
    expect(page.locator("#control_image-error")).to_contain_text("Control image")
    expect(page.locator("#status")).to_have_class("status error")
    watched.close()


def test_controlnet_inpainting_repaints_the_painted_area_of_the_control_image(browser, live):
    """With the model's inpainting ControlNet (/info's task controlnet-inpaint), a mask painted on
    the control image and no picture to start from: the masked area is repainted, the rest of the
    control image kept exactly; a mask of the wrong size shows the API's 400 on the mask field."""
    watched = open_page(browser, live)
    page = watched.page
    picture = png(3)
    page.click("#control-fields summary")
    expect(page.locator("#control-inpaint")).to_be_hidden()  # until there is a control image
    page.set_input_files("#control_image", files=[file("house.png", picture)])
    expect(page.locator("#control-inpaint")).to_be_visible()
    page.wait_for_function(f"() => document.getElementById('control-mask').width === {SIZE}")
    box = page.locator("#control-mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.8, steps=8)
    page.mouse.up()
    generate(page, 1)
    sent = last_job(page)
    assert "image" not in sent and base64.b64decode(sent["control_image"]) == picture
    assert_repainted_inside_the_mask(page, sent, picture, "ControlNet inpainting · 512 × 512", "control image")
    screenshot(page, "web-family-controlnet-inpaint.png")

    # An uploaded mask replaces the painted one; one of another size is the API's 400, on its field.
    page.set_input_files("#control_mask", files=[file("small.png", png(4, (96, 64), "RGBA"))])
    page.click("#generate")
    expect(page.locator("#control_mask-error")).to_be_visible()
    expect(page.locator("#control_mask-error")).to_contain_text("Mask")
    assert base64.b64decode(last_job(page)["mask"]) == png(4, (96, 64), "RGBA")
    watched.close()


def test_layers_side_by_side_and_stacked_each_an_rgba_png(browser, live):
    watched = open_page(browser, live)
    page = watched.page
    page.click("label[for='mode-layered']")
    expect(page.locator("#generate")).to_have_text("Split into layers")
    expect(page.locator("#aspect_ratio")).to_be_hidden()  # the picture sets the size
    expect(page.locator("#start-fields")).to_be_hidden()
    page.fill("#num_inference_steps", "2")

    page.click("#generate")  # no picture yet: said on its field, nothing sent
    expect(page.locator("#layered_image-error")).to_contain_text("Choose the picture")
    page.set_input_files("#layered_image", files=[file("poster.png", png(3, (96, 64), "RGBA"))])
    page.fill("#layers", "11")  # the API's 400 names `layers`
    page.click("#generate")
    expect(page.locator("#layers-error")).to_be_visible()
    expect(page.locator("#layers-error")).to_contain_text("Layers")

    page.fill("#layers", "3")
    page.click("#generate")
    expect(page.locator("#layers-list li")).to_have_count(3, timeout=SLOW)
    expect(page.locator("#layers-figure")).to_be_visible()
    expect(page.locator("#layers-meta")).to_contain_text("3 layers")
    page.wait_for_function("() => [...document.querySelectorAll('#layers-figure img')]"
                           ".every((i) => i.complete && i.naturalWidth > 0)")
    sizes = set()
    for index in range(3):
        item = f"#layers-list li:nth-child({index + 1})"
        layer = Image.open(io.BytesIO(download(page, f"{item} a")))
        assert layer.format == "PNG" and layer.mode == "RGBA"
        sizes.add(layer.size)
        link = page.locator(f"{item} a")
        expect(link).to_have_text(f"Download layer {index + 1}")
        assert link.get_attribute("download") == f"qwen-image-layer-42-{index + 1}.png"
        assert link.get_attribute("href") == page.eval_on_selector(f"{item} img", "i => i.src")
    assert len(sizes) == 1

    # Stacked: the same layers, in order, one over the other on the same box.
    stacked = page.eval_on_selector_all("#layers-stack img", """imgs => imgs.map((i) => {
        const box = i.getBoundingClientRect();
        return [i.src, getComputedStyle(i).position, box.x, box.y, box.width, box.height];
    })""")
    listed = page.eval_on_selector_all("#layers-list img", "imgs => imgs.map((i) => i.src)")
    assert [src for src, *_ in stacked] == listed
    assert {position for _, position, *_ in stacked} == {"absolute"}
    assert len({tuple(item[2:]) for item in stacked}) == 1
    screenshot(page, "web-family-layers.png")

    # Cancel: no job on this route, so the page drops the request and the server cancels it.
    cancelled = live.scheduler()["cancelled"]
    with hold_engine(live):
        page.click("#generate")
        live.wait_running(what="the split to run")
        page.click("#cancel")
        expect(page.locator("#status")).to_have_text("Cancelled: the picture was not split.")
        expect(page.locator("#generate")).to_have_text("Split into layers")
    live.wait_scheduler("the split to be cancelled", cancelled=cancelled + 1, running_batch_size=0)
    expect(page.locator("#layers-list li")).to_have_count(3)  # the last layers stay on show
    expect(page.locator("#layers-figure")).to_be_visible()
    watched.close()


def test_no_controlnet_section_nor_layers_on_a_server_without_them(browser, tmp_path):
    server = LiveServer(tiny_settings(tmp_path, model="painter=tiny"), engine_factory=FakeEngine).start()
    try:
        watched = Watched(browser, server.url)
        page = watched.page
        page.goto(server.url + "/")
        expect(page.locator("#server-info")).to_contain_text("painter")
        expect(page.locator("#mode-layered")).to_be_disabled()
        expect(page.locator("#layered-help")).to_be_visible()
        expect(page.locator("#control-fields")).to_be_hidden()
        expect(page.locator("#start-fields")).to_be_visible()  # every generation model starts from a picture
        watched.close()
    finally:
        server.stop()

