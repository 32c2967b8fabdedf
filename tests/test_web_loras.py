"""The playground's LoRA picker in headless Chromium (as tests/test_web.py drives the page): the
usable LoRAs of the server's library, a Lightning one setting its steps and CFG, the chosen LoRA
and scale reaching the engine, a scale out of range shown on its field, and no picker on a server
without LoRAs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import expect

from tests.conftest import LiveServer, tiny_settings
from tests.test_web import Watched, screenshot, wait_for_image

pytestmark = pytest.mark.xdist_group("web_loras")


@pytest.fixture(scope="module")
def live(tmp_path_factory, lora_dir) -> Iterator[LiveServer]:
    server = LiveServer(tiny_settings(tmp_path_factory.mktemp("web-loras"), lora_dir=lora_dir)).start()
    yield server
    server.stop()


def test_the_picker_offers_usable_loras_and_sends_the_choice(browser, live):
    watched = Watched(browser, live.url, viewport={"width": 1280, "height": 900})
    page = watched.page
    page.goto(live.url + "/")
    expect(page.locator("#lora-row")).to_be_visible()
    options = page.locator("#loras option").all_inner_texts()
    # Files that are not LoRAs and LoRAs for another model are not offered ("broken" is, until its
    # first load fails); a Lightning LoRA says what it is.
    assert options == ["None", "broken", "edit-style", "ink", "style",
                       "tiny-Lightning-4steps (Lightning, 4 steps)"], options

    page.select_option("#loras", "tiny-Lightning-4steps")
    expect(page.locator("#num_inference_steps")).to_have_value("4")
    expect(page.locator("#true_cfg_scale")).to_have_value("1")

    page.select_option("#loras", "style")
    page.fill("#lora_scale", "9")
    page.fill("#num_inference_steps", "2")
    page.fill("#prompt", "a lighthouse")
    page.click("#generate")
    expect(page.locator("#lora_scale-error")).to_be_visible()
    expect(page.locator("#lora_scale-error")).to_contain_text("4")

    page.fill("#lora_scale", "0.75")
    page.click("#generate")
    wait_for_image(page)
    assert live.hook.specs[-1].loras == (("style", 0.75),)
    screenshot(page, "web-lora-picker.png")
    watched.close()


def test_no_picker_without_a_lora_library(browser, tiny_server):
    watched = Watched(browser, tiny_server.url)
    page = watched.page
    page.goto(tiny_server.url + "/")
    expect(page.locator("#server-info")).to_contain_text("tiny on cpu")
    expect(page.locator("#lora-row")).to_be_hidden()
    watched.close()
