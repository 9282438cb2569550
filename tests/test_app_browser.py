"""``bolid app`` in a real browser: the CLI serves the page on 127.0.0.1, headless Chromium uses it like a person.

Playwright for Python drives Debian's Chromium (``make browser`` installs it; Playwright's own browser
download is not used). The test uploads the bundled photo, sees the keypoint overlay and the shape chart,
sets the sliders and the seed, generates, sees the images and the Body Sim table, downloads
``settings.json`` and checks it holds the chosen values, uploads bad files and sees their messages (and no
traceback), checks that a second browser session sees none of the first one's results, and stops the server
with Ctrl-C, after which its temporary folder is gone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from bolid.app import EXAMPLES

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Chromium not found: install it with `make browser` (Debian: apt-get install chromium) to run this test",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """``python -m bolid app`` on a free port, with its own temporary folders under ``tmp_path``."""
    port = _free_port()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name in ("GRADIO_ANALYTICS_ENABLED", "GRADIO_TEMP_DIR"):  # the app sets these itself
        env.pop(name, None)
    cmd = [sys.executable, "-m", "bolid", "app", "--components", "tiny", "--pose", "blazepose", "--port", str(port)]
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                log.close()
                pytest.fail(f"the app did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
    yield url, proc, tmp
    if proc.poll() is None:
        proc.kill()
    log.close()


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def test_upload_generate_download_and_bad_uploads_in_chromium(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, proc, tmp = server
    photo = EXAMPLES / "coco_000000000785.jpg"
    truncated = tmp_path / "broken.jpg"
    truncated.write_bytes(photo.read_bytes()[:5000])
    text = tmp_path / "notes.png"
    text.write_text("not an image at all")
    empty = tmp_path / "empty-room.png"
    Image.linear_gradient("L").resize((640, 480)).convert("RGB").save(empty)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.locator("#refs input[type=file]").set_input_files(str(photo))
        # The keypoint overlay: the photo with what BoLID reads drawn on it, and the body-shape chart.
        overlay = page.locator("#overlays img").first
        expect(overlay).to_be_visible(timeout=120_000)
        loaded = page.wait_for_function("(img) => img.complete && img.naturalWidth", arg=overlay.element_handle())
        assert loaded.json_value() == 640  # the photo's own width: drawn on, not cropped or replaced
        expect(page.locator("#ref-status")).to_contain_text("coco_000000000785.jpg: 1 person, face visible")
        expect(page.locator("#shape img, #shape svg, #shape canvas").first).to_be_visible()

        _set_number(page, "lambda-face", 0.7)
        _set_number(page, "lambda-body", 1.3)
        page.locator("#seed input").fill("5")
        page.locator("#prompt textarea").fill("a person on a beach at sunset")
        page.locator("#generate").click()
        expect(page.locator("#gen-status")).to_contain_text("Generated 2 image(s)", timeout=180_000)
        expect(page.locator("#gallery img")).to_have_count(4)  # BoLID and base image for seeds 5 and 6
        table = page.locator("#bodysim")
        expect(table).to_contain_text("BoLID, seed 5")
        expect(table).to_contain_text("base model, seed 6")
        expect(table).to_contain_text("no body found in the generated image")  # tiny kit: noise, counted
        expect(page.locator("#command textarea")).to_have_value(re.compile(r"--scale-face=0\.7 --scale-body=1\.3"))

        with page.expect_download() as info:
            page.locator("#downloads a[download='settings.json']").click()
        settings = json.loads(Path(info.value.path()).read_text())
        assert settings["command"] == "app" and settings["prompt"] == "a person on a beach at sunset"
        assert (settings["scale_face"], settings["scale_body"], settings["seeds"]) == (0.7, 1.3, [5, 6])
        assert settings["components"] == "tiny" and settings["pose"] == "blazepose"
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        if os.environ.get("BOLID_APP_SCREENSHOT"):  # e.g. docs/app.png for the README
            page.screenshot(path=os.environ["BOLID_APP_SCREENSHOT"], full_page=True)

        # Another browser session: none of the first one's references or results, and the server does not hand
        # out its files by path (only the copies behind the content-hashed links it gave the first session).
        other = browser.new_context().new_page()
        other.goto(url)
        expect(other.locator("#generate")).to_be_visible(timeout=60_000)
        expect(other.locator("#gallery img")).to_have_count(0)
        expect(other.locator("#overlays img")).to_have_count(0)
        expect(other.locator("#downloads a")).to_have_count(0)
        (written,) = tmp.glob("bolid-app-*/run-*/settings.json")
        assert other.request.get(f"{url}gradio_api/file={written}").status == 403

        # Bad uploads beside the good photo: a message per file, and the good photo stays in use.
        page.locator("#refs input[type=file]").set_input_files([str(truncated), str(text), str(empty)])
        status = page.locator("#ref-status")
        expect(status).to_contain_text("broken.jpg: not a readable image", timeout=60_000)
        expect(status).to_contain_text("notes.png: not a readable image")
        expect(status).to_contain_text("empty-room.png: no person found")
        expect(status).to_contain_text("coco_000000000785.jpg: 1 person")
        expect(page.locator("#overlays img")).to_have_count(1)
        # Only bad uploads: nothing to generate from, and the page says so.
        page.locator("#refs button[aria-label='Clear']").click()
        expect(page.locator("#overlays img")).to_have_count(0, timeout=30_000)
        page.locator("#refs input[type=file]").set_input_files([str(truncated)])
        expect(status).to_contain_text("No usable photo yet", timeout=60_000)
        page.locator("#generate").click()
        expect(page.locator("#gen-status")).to_contain_text("no usable reference photo", timeout=60_000)
        assert "Traceback" not in page.content()
        browser.close()

    proc.send_signal(signal.SIGINT)  # Ctrl-C: the server stops and deletes its temporary files
    assert proc.wait(timeout=60) == 0
    assert not list(tmp.glob("bolid-app-*")) and not (tmp / "gradio").exists()  # uploads and outputs are gone
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "http://127.0.0.1:" in log
