"""The web demo end to end in a real browser: `diffusers-hyperlora demo` on the tiny default, driven by Chromium.

The server is the real command (`python -m diffusers_hyperlora.cli demo --port N`) on 127.0.0.1. Headless
Chromium (Debian's package; `scripts/install-browser.sh` installs it) is driven with Playwright. The photos are
real: scikit-image's astronaut with the tiny detector's face marker drawn on the face (the tiny default's face
detector finds marked faces, see `diffusers_hyperlora.testing.tiny_face`), and the coffee photo, which has no face.
The generated image is compared with what `DemoEngine` produces in this process for the same settings, so the
page's controls must reach the pipeline. Errors must show right under the button pressed, in the page's words.

The server runs with its own temp folder: when it is stopped (SIGTERM) it must exit cleanly and leave none of its
work folders behind. The screenshot goes to a temp folder; `HYPERLORA_DEMO_PICTURE=docs/images/demo.png` also
writes it there (that is how the docs' picture is refreshed; a plain test run leaves the repository untouched).
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio", reason="the demo extra is not installed: pip install -e '.[demo]'")
pytest.importorskip("insightface", reason="the demo extra is not installed: pip install -e '.[demo]'")
playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is not installed (test extra)")

from diffusers_hyperlora.testing.tiny_face import ASTRONAUT_FACE, draw_face_marker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PICTURE_VARIABLE = "HYPERLORA_DEMO_PICTURE"  # where to copy the screenshot, e.g. docs/images/demo.png
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_TIMEOUT = 180.0  # seconds; the tiny default itself starts in seconds on an idle machine
STEP_TIMEOUT = 120_000  # milliseconds for one page action (generation runs on the CPU)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium on this machine and none could be installed (run scripts/install-browser.sh as root)")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The demo command on a free port; yields its URL, then stops it and checks that it exited cleanly."""
    port = free_port()
    log = tmp_path_factory.mktemp("demo-server") / "server.log"
    server_temp = tmp_path_factory.mktemp("demo-server-temp")  # the server's temp folder: its work folder is there
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    env["TMPDIR"] = str(server_temp)
    command = [sys.executable, "-m", "diffusers_hyperlora.cli", "demo", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    start = time.perf_counter()
    try:
        while "HyperLoRA demo running on" not in log.read_text():
            if process.poll() is not None:
                pytest.fail(f"the demo exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            if time.perf_counter() - start > START_TIMEOUT:
                pytest.fail(f"the demo did not start within {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        print(f"demo started in {time.perf_counter() - start:.1f} s")
        assert list(server_temp.glob("hyperlora-demo-*")), "the demo's work folder is not in its temp folder"
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    output = log.read_text()
    assert process.returncode == 0, f"the demo exited with {process.returncode} on SIGTERM:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    assert not list(server_temp.glob("hyperlora-demo-*")), "the demo left its work folder behind"


@pytest.fixture(scope="module")
def page(server, chromium_path):
    # Playwright runs Chromium headless with a fresh temporary profile of its own.
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(STEP_TIMEOUT)
        page.goto(server)
        page.wait_for_selector("#generate-button")
        yield page
        browser.close()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photos")
    astronaut = folder / "astronaut.png"
    Image.fromarray(draw_face_marker(skimage_data.astronaut(), ASTRONAUT_FACE)).save(astronaut)
    moved = folder / "astronaut_moved.png"  # the face marked a little lower: another "person" for a slider
    Image.fromarray(draw_face_marker(skimage_data.astronaut(), (170, 90, 270, 210))).save(moved)
    coffee = folder / "coffee.png"
    Image.fromarray(skimage_data.coffee()).save(coffee)
    broken = folder / "broken.png"
    broken.write_bytes(b"this is not an image")
    from test_demo_engine import fake_png

    huge = fake_png(folder / "huge.png", 15000, 15000)  # its header says 225 MP: PIL's DecompressionBombError
    return {"astronaut": astronaut, "moved": moved, "coffee": coffee, "broken": broken, "huge": huge}


def upload(page, selector: str, *paths: Path) -> None:
    """Replace the files of the upload box `selector` by `paths` (Gradio adds uploads to the files already there)."""
    clear = page.locator(f"{selector} button[aria-label=Clear]")
    if clear.count():
        clear.first.click()
        playwright_api.expect(page.locator(f"{selector} .file-preview")).to_have_count(0, timeout=STEP_TIMEOUT)
    page.locator(f"{selector} input[type=file]").set_input_files([str(p) for p in paths])
    for path in paths:  # the uploaded file's row (its text splits the name: "astronaut .png")
        row = page.locator(f'{selector} .file-preview [aria-label="{path.name}"]')
        playwright_api.expect(row).to_have_count(1, timeout=STEP_TIMEOUT)


def wait_status(page, *texts: str, box: str = "#status") -> str:
    """Wait until the status line `box` contains every one of `texts`; returns its text."""
    status = page.locator(box)
    for text in texts:
        playwright_api.expect(status).to_contain_text(text, timeout=STEP_TIMEOUT)
    return status.inner_text()


def click(page, button: str, *texts: str, box: str) -> str:
    """Click `button`, wait for `texts` in the status line `box`, and check that the line sits right under the
    button, where the eye already is (not below the fold under the result)."""
    page.click(button)
    text = wait_status(page, *texts, box=box)
    pressed, line = page.locator(button).bounding_box(), page.locator(box).bounding_box()
    assert 0 <= line["y"] - (pressed["y"] + pressed["height"]) < 150, (button, box, pressed, line)
    return text


def assert_page_words(text: str) -> None:
    """An error line a visitor can act on: no traceback, no server path, no Python type names."""
    body = text.strip().removeprefix("Error:")
    assert "Traceback" not in body and "/tmp" not in body and "gradio" not in body, text
    for word in ("numpy", "PIL", "torch", "HyperLoRAIdentity", "Error:"):
        assert word not in body, text


def fetch(page, url: str) -> bytes:
    if url.startswith("data:"):
        return base64.b64decode(url.split(",", 1)[1])
    response = page.request.get(url if url.startswith("http") else page.url.rstrip("/") + "/" + url.lstrip("/"))
    assert response.ok, f"{url}: HTTP {response.status}"
    return response.body()


def result_source(page) -> str:
    return page.locator("#result img").first.get_attribute("src")


def expected_image(photo: Path) -> np.ndarray:
    """What the engine makes in this process for the page's default settings (same seeds, same tiny models)."""
    from diffusers_hyperlora.demo import DemoEngine, GenerationSettings

    engine = DemoEngine.tiny_default()
    identity = engine.identity_from_inputs([str(photo)])
    settings = GenerationSettings(
        prompt="a photo of a person as an astronaut, portrait", negative_prompt="blurry, low quality"
    )
    image, _ = engine.generate(identity, settings)
    engine.close()
    return np.asarray(image, dtype=np.float32)


def test_demo_in_browser(page, photos, tmp_path):
    # a real photo -> identity -> image
    upload(page, "#photos", photos["astronaut"])
    wait_status(page, "1 file(s) ready", box="#photo-status")
    click(page, "#preview-button", "Preview: 5 crop(s)", box="#photo-status")
    caption = page.locator("#preview .caption-label").first
    playwright_api.expect(caption).to_have_text("CLIP crop", timeout=STEP_TIMEOUT)
    assert caption.evaluate("e => e.scrollWidth <= e.clientWidth"), "the crop's caption is cut"
    status = click(page, "#generate-button", "Generated with identity of 1 photo(s): astronaut.png", box="#status")
    assert "fcsks fxhks fhyks, a photo of a person as an astronaut" in status  # trigger words added
    result = np.asarray(Image.open(io.BytesIO(fetch(page, result_source(page)))).convert("RGB"), dtype=np.float32)
    assert result.shape == (128, 128, 3)
    assert result.std() > 1.0  # an image, not a blank
    assert np.abs(result - expected_image(photos["astronaut"])).max() <= 2.0  # the page's settings reached the pipe

    screenshot = tmp_path / "demo.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert Image.open(screenshot).size[0] >= 1280
    if os.environ.get(PICTURE_VARIABLE):  # refresh the docs' picture on request only
        shutil.copyfile(screenshot, ROOT / os.environ[PICTURE_VARIABLE])

    # downloads: the identity file and the LoRA file (kohya by default)
    from safetensors import safe_open

    from diffusers_hyperlora import HyperLoRAIdentity

    page.get_by_text("Identity and LoRA files").click()
    click(page, "#save-identity-button", "Saved the identity of 1 photo(s)", box="#files-status")
    identity_path = page.locator("#identity-file a").first.get_attribute("href")
    data = fetch(page, identity_path)
    identity_file = tmp_path / "downloaded_identity.safetensors"
    identity_file.write_bytes(data)
    assert HyperLoRAIdentity.load(identity_file).num_images == 1
    click(page, "#export-lora-button", "Exported the ID LoRA (kohya format)", box="#files-status")
    lora_file = tmp_path / "downloaded_lora.safetensors"
    lora_file.write_bytes(fetch(page, page.locator("#lora-file a").first.get_attribute("href")))
    with safe_open(str(lora_file), "pt") as handle:
        keys = list(handle.keys())
    assert keys and all(k.startswith("lora_unet_") for k in keys)

    # a slider from two photo sets, used at the page's default weight (0.7)
    page.get_by_text("Build a slider from two photo sets").click()
    upload(page, "#slider-neutral", photos["astronaut"])
    upload(page, "#slider-edited", photos["moved"])
    page.locator("#slider-name [data-testid=textbox]").fill("moved")
    click(page, "#slider-button", "Slider 'moved' ready", box="#slider-status")
    page.click("#generate-button")
    wait_status(page, "slider 'moved' at 0.7")
    with_slider = np.asarray(Image.open(io.BytesIO(fetch(page, result_source(page)))).convert("RGB"), np.float32)
    assert not np.array_equal(with_slider, result)  # the slider adapter is active (small effect on the tiny model)

    # a real photo: the tiny detector finds only framed faces, and the page says so and points to the example
    upload(page, "#photos", photos["coffee"])
    status = click(
        page, "#generate-button", "Error:", "No face was found in coffee.png", "example photo", box="#status"
    )
    assert_page_words(status)
    playwright_api.expect(page.locator("#result img")).to_have_count(0, timeout=STEP_TIMEOUT)

    # an unreadable file, and a photo too large to decode: a line under the button pressed
    upload(page, "#photos", photos["broken"])
    status = click(page, "#identity-button", "Error:", "broken.png could not be read as an image", box="#photo-status")
    assert_page_words(status)
    upload(page, "#photos", photos["huge"])
    status = click(page, "#preview-button", "Error:", "huge.png", "at most 40 MP", box="#photo-status")
    assert_page_words(status)

    # a seed out of torch's range: a clear line, not "Overflow when unpacking long long"
    upload(page, "#photos", photos["astronaut"])
    page.locator("#seed input").fill(str(2**64))
    status = click(page, "#generate-button", "Error:", "Seed must be a whole number", box="#status")
    assert_page_words(status)
    page.locator("#seed input").fill("0")

    # the app keeps working
    click(page, "#generate-button", "Generated with identity of 1 photo(s): astronaut.png", box="#status")
    playwright_api.expect(page.locator("#result img")).to_have_count(1, timeout=STEP_TIMEOUT)
