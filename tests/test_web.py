"""The web playground end to end: headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright) against a real in-process server on the tiny model.

Generate with live progress, cancel a queued job, the queue-full, validation and network
errors in plain words, the gallery (enlarge, download, reuse settings), a phone-sized layout,
and a server with API keys where the page asks for the key. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import CHROMIUM, ROOT, LiveServer, hold_engine, tiny_settings

pytestmark = pytest.mark.xdist_group("web")  # one browser and one server for the module
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium) "
                "to run the browser tests", allow_module_level=True)

# Not optional once Chromium is there: CI installs it from requirements-test.txt.
from playwright.sync_api import Browser, Page, expect  # noqa: E402

ARTIFACTS = ROOT / "test-artifacts"
KEY = "playground-test-key"
SLOW = 60_000  # ms: a 4-step tiny-model job takes ~6 s on 2 CPU cores; leave room for slow CI


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveServer]:
    # max_queue=1: one held job fills the queue, so the page's next job gets a real 429.
    server = LiveServer(tiny_settings(tmp_path_factory.mktemp("web"), max_queue=1)).start()
    yield server
    server.stop()


class Watched:
    """A page plus what must not happen on it: script errors, requests to other origins."""

    def __init__(self, browser: Browser, origin: str, **context_options) -> None:
        self.context = browser.new_context(**context_options)
        self.page: Page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.errors: list[str] = []
        self.foreign: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        # Console errors too (a CSP refusal shows up there), except the browser's own note on
        # each HTTP error answer, which these tests provoke on purpose.
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error"
                     and not m.text.startswith("Failed to load resource") else None)
        self.page.on("request", lambda r: None if r.url.startswith((origin, "blob:", "data:"))
                     else self.foreign.append(r.url))

    def close(self) -> None:
        self.context.close()
        assert not self.errors, f"JavaScript errors on the page: {self.errors}"
        assert not self.foreign, f"the page fetched something from elsewhere: {self.foreign}"


def screenshot(page: Page, name: str, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=full_page)
    return path


def record_progress(page: Page) -> None:
    """Remember every value the progress bar takes (a MutationObserver misses no update)."""
    page.evaluate("""() => {
        window.__progress = [];
        const bar = document.getElementById('progress');
        new MutationObserver(() => window.__progress.push(Number(bar.getAttribute('aria-valuenow'))))
            .observe(bar, {attributes: true, attributeFilter: ['aria-valuenow']});
    }""")


def wait_for_image(page: Page) -> None:
    page.wait_for_function(
        "() => { const i = document.getElementById('result-image');"
        " return i && i.complete && i.naturalWidth > 0 && !document.getElementById('result-figure').hidden; }",
        timeout=SLOW)


def test_generate_cancel_errors_and_gallery(browser, live):
    watched = Watched(browser, live.url, viewport={"width": 1280, "height": 800})
    page = watched.page
    page.goto(live.url + "/")
    expect(page).to_have_title("Qwen-Image playground")

    # Defaults: the documented ones, aspect ratios (with sizes) from the server's /info.
    expect(page.locator("#server-info")).to_contain_text("tiny on cpu")
    expect(page.locator("#aspect_ratio")).to_have_value("s1:1")
    options = page.locator("#aspect_ratio option").all_inner_texts()
    assert options[0] == "s1:1 — 512 × 512" and "16:9 — 1664 × 928" in options and len(options) == 9
    for field, value in (("#num_inference_steps", "20"), ("#true_cfg_scale", "4"), ("#seed", "42"),
                         ("#language", "en"), ("#negative_prompt", "")):
        expect(page.locator(field)).to_have_value(value)
    expect(page.locator("#add_overlay")).to_be_checked()
    expect(page.locator("#save_to_file")).not_to_be_checked()
    page.click("#random-seed")
    assert 0 <= int(page.input_value("#seed")) <= 2**32 - 1
    page.fill("#seed", "42")

    # -- generate with Enter, watch the progress bar reach 100 %, see the image ------------
    page.fill("#num_inference_steps", "4")
    page.select_option("#aspect_ratio", "s1:1")
    prompt = page.locator("#prompt")
    prompt.click()
    prompt.press_sequentially("a lighthouse")
    prompt.press("Shift+Enter")  # a new line, not a submit
    prompt.press_sequentially("at dusk")
    assert prompt.input_value() == "a lighthouse\nat dusk"
    expect(page.locator("#status")).to_have_text("Ready.")
    record_progress(page)
    prompt.press("Enter")
    expect(page.locator("#cancel")).to_be_visible()
    wait_for_image(page)
    assert page.eval_on_selector("#result-image", "i => i.naturalWidth") == 512
    assert page.eval_on_selector("#result-image", "i => i.naturalHeight") == 512
    expect(page.locator("#progress")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#progress-label")).to_have_text("Step 4 / 4 · 100%")
    progress = page.evaluate("window.__progress")
    assert progress[-1] == 100 and any(0 < v < 100 for v in progress), progress  # driven by steps
    expect(page.locator("#result-meta")).to_contain_text("512 × 512 · seed 42 · 4 steps")
    assert re.search(r"\d+\.\d\d s", page.inner_text("#result-meta"))
    expect(page.locator("#status")).to_contain_text("Done in")
    expect(page.locator("#cancel")).to_be_hidden()
    expect(page.locator("#gallery li")).to_have_count(1)
    screenshot(page, "web-playground-1280x800.png")

    # -- cancel a job that waits behind a busy engine ------------------------------------
    with hold_engine(live):
        blocker = httpx.post(f"{live.url}/v1/jobs", json={"prompt": "blocker", "num_inference_steps": 2}).json()
        live.wait_running(what="the blocker to run")
        page.fill("#prompt", "a job to cancel")
        page.click("#generate")
        expect(page.locator("#status")).to_have_text("Waiting in the queue: yours is next.")
        expect(page.locator("#progress-label")).to_have_text("Queued")
        screenshot(page, "web-playground-queued.png")
        page.click("#cancel")
        expect(page.locator("#status")).to_have_text("Cancelled: the job was stopped and no image was made.")
        expect(page.locator("#generate")).to_be_enabled()
        assert live.scheduler()["cancelled"] == 1

        # -- queue full: a real 429, its Retry-After in plain words ------------------------
        filler = httpx.post(f"{live.url}/v1/jobs", json={"prompt": "filler", "num_inference_steps": 2}).json()
        page.fill("#prompt", "one job too many")
        page.click("#generate")
        expect(page.locator("#form-error")).to_contain_text("The server is busy: its queue is full.")
        assert re.search(r"Try again in \d+ seconds?\.", page.inner_text("#form-error"))
        for job in (filler, blocker):
            httpx.delete(f"{live.url}/v1/jobs/{job['id']}")

    # -- validation: the server's 400 next to the field it names; an empty prompt --------
    page.fill("#num_inference_steps", "101")
    page.click("#generate")
    steps_error = page.locator("#num_inference_steps-error")
    expect(steps_error).to_have_text("Steps must be less than or equal to 100.")
    expect(page.locator("#num_inference_steps")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#status")).to_have_text("Steps must be less than or equal to 100.")
    page.fill("#num_inference_steps", "4")
    expect(steps_error).to_be_hidden()  # editing the field clears its error
    page.fill("#prompt", "   ")
    page.click("#generate")
    expect(page.locator("#prompt-error")).to_have_text("Please write a prompt: describe the image you want.")
    screenshot(page, "web-playground-validation.png")

    # -- the server cannot be reached -------------------------------------------------
    page.route("**/v1/jobs", lambda route: route.abort("connectionrefused"))
    page.fill("#prompt", "while the server is down")
    page.click("#generate")
    expect(page.locator("#form-error")).to_contain_text("Cannot reach the server.")
    page.unroute("**/v1/jobs")

    # -- gallery: enlarge, download the PNG, reuse the settings ---------------------------
    page.click("#gallery li button")
    viewer = page.locator("#viewer")
    expect(viewer).to_be_visible()
    expect(page.locator("#viewer-meta")).to_contain_text("512 × 512 · seed 42")
    screenshot(page, "web-playground-viewer.png", full_page=False)  # the modal covers the viewport
    with page.expect_download() as download:
        page.click("#viewer-download")
    assert download.value.suggested_filename.endswith(".png")
    assert Path(download.value.path()).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page.click("#viewer-reuse")
    expect(viewer).to_be_hidden()
    expect(page.locator("#prompt")).to_have_value("a lighthouse\nat dusk")
    expect(page.locator("#num_inference_steps")).to_have_value("4")

    # The gallery outlives a reload (IndexedDB), newest first.
    page.reload()
    expect(page.locator("#gallery li")).to_have_count(1)
    page.wait_for_function("() => document.querySelector('#gallery img').naturalWidth === 512")
    watched.close()


def test_the_image_fills_in_live_then_the_final_image_replaces_it(browser, live):
    hook = live.hook
    watched = Watched(browser, live.url, viewport={"width": 1280, "height": 800})
    page = watched.page
    page.goto(live.url + "/")
    page.fill("#num_inference_steps", "3")
    page.fill("#prompt", "a lighthouse in fog")
    hook.hold_after_next_preview()
    try:
        with page.expect_response(lambda r: r.url.endswith("/v1/jobs") and r.request.method == "POST") as sent:
            page.click("#generate")
        assert sent.value.request.post_data_json["preview"] == "latent"
        assert hook.previewed.wait(SLOW / 1000), "no preview was made"
        # The engine waits after step 1: what the page shows is the image so far.
        preview = page.locator("#preview-image")
        expect(preview).to_be_visible()
        page.wait_for_function("() => document.getElementById('preview-image').naturalWidth === 128")
        assert page.eval_on_selector("#preview-image", "i => i.getBoundingClientRect().width") > 256  # scaled up
        expect(page.locator("#preview-caption")).to_have_text("Preview after step 1 of 3")
        expect(page.locator("#result-empty")).to_be_hidden()
        screenshot(page, "web-playground-preview.png")
        hook.release()
        wait_for_image(page)
    finally:
        hook.reset()
    expect(preview).to_be_hidden()
    assert page.eval_on_selector("#result-image", "i => i.naturalWidth") == 512
    watched.close()


def test_phone_width_layout(browser, live):
    watched = Watched(browser, live.url, viewport={"width": 390, "height": 844}, is_mobile=True,
                      has_touch=True, device_scale_factor=2)
    page = watched.page
    page.goto(live.url + "/")
    expect(page.locator("#server-info")).to_contain_text("tiny on cpu")
    # Nothing wider than the screen; the form and the result stack in one column.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    form, result = (page.locator(s).bounding_box() for s in ("#generate-form", ".result"))
    assert result["y"] >= form["y"] + form["height"]
    page.select_option("#aspect_ratio", "16:9")  # the longest label must fit
    page.locator("#generate").focus()
    outline = page.eval_on_selector("#generate", "b => getComputedStyle(b).outlineStyle")
    assert outline == "solid"  # keyboard focus is visible
    screenshot(page, "web-playground-phone.png")
    watched.close()


def test_with_an_api_key_the_page_asks_for_it_once(browser, tmp_path):
    live = LiveServer(tiny_settings(tmp_path, api_keys=[KEY])).start()
    try:
        assert httpx.get(f"{live.url}/info").status_code == 401
        watched = Watched(browser, live.url, viewport={"width": 1280, "height": 800})
        page = watched.page
        page.goto(live.url + "/")  # the page and its files need no key
        key_form = page.locator("#key-form")
        expect(key_form).to_be_visible()
        expect(page.locator("#api-key")).to_be_focused()
        screenshot(page, "web-playground-api-key.png")

        page.fill("#api-key", "not-the-key")
        page.press("#api-key", "Enter")
        expect(page.locator("#key-error")).to_have_text("The saved API key was not accepted. Enter a valid key.")
        page.fill("#api-key", KEY)
        page.click("#key-form button[type=submit]")
        expect(key_form).to_be_hidden()
        expect(page.locator("#server-info")).to_contain_text("tiny on cpu")

        page.fill("#prompt", "a locked door")
        page.fill("#num_inference_steps", "2")
        page.click("#generate")
        wait_for_image(page)  # SSE and the image were fetched with the key
        assert page.eval_on_selector("#result-image", "i => i.naturalWidth") == 512
        expect(page.locator("#progress")).to_have_attribute("aria-valuenow", "100")

        page.reload()  # the key is remembered: no second question
        expect(page.locator("#server-info")).to_contain_text("tiny on cpu")
        expect(key_form).to_be_hidden()
        expect(page.locator("#forget-key")).to_be_visible()
        watched.close()
    finally:
        live.stop()
