"""`dystream serve` in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by selenium)
with a fake microphone playing a wav opens the page, uploads a reference and a voice, starts a call, plays at least
3 s of the avatar's video, shows frames and latency in the statistics, and hanging up frees the call; a second call
sends the avatar's voice from a file the page plays into a second track.

Without a browser the test is skipped with the reason; DYSTREAM_REQUIRE_BROWSER=1 (set by .ci/run) makes that a
failure, so CI cannot pass without having run it."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from serve_common import build_app, png_bytes, speech_like, write_exports, write_wav

from dystream.serving.app import REGISTRY
from dystream.serving.local import LocalServer

TOKEN = "browser-test-token"


def _browser() -> tuple[str, str]:
    """(chromium binary, chromedriver) or skip / fail with the reason."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[dev]')")
    binary = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if binary is None:
        missing.append("a chromium binary (apt-get install chromium)")
    if driver is None:
        missing.append("chromedriver (apt-get install chromium-driver)")
    if missing:
        reason = "browser test needs " + ", ".join(missing)
        if os.environ.get("DYSTREAM_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (DYSTREAM_REQUIRE_BROWSER=1)")
        pytest.skip(reason)
    return binary, driver


def _until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


@pytest.mark.timeout(120)
def test_page_streams_the_avatar_in_headless_chromium(tmp_path, monkeypatch):
    # all media on loopback: the server offers only 127.0.0.1 (--ice-address) and Chromium, which skips loopback
    # interfaces by default, gathers them too (without the flag the call never connects in a network namespace
    # that has only loopback, as a CI container may be: checked with `unshare -n`)
    binary, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must not look for drivers online
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    partner = write_wav(tmp_path / "partner.wav", speech_like(8.0, seed=5))
    voice = write_wav(tmp_path / "voice.wav", speech_like(8.0, seed=6))
    reference = tmp_path / "reference.png"
    reference.write_bytes(png_bytes(48, 48, seed=7))
    app = build_app(write_exports(tmp_path), "--token", TOKEN, "--ice-address", "127.0.0.1", "--idle-timeout", "5")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={partner}", f"--user-data-dir={tmp_path / 'profile'}",
                 "--autoplay-policy=no-user-gesture-required", "--window-size=1280,860",
                 "--allow-loopback-in-peer-connection"):  # fmt: skip
        options.add_argument(flag)
    try:
        with LocalServer(app) as server:
            browser = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
            try:
                browser.set_page_load_timeout(30)
                browser.set_script_timeout(10)
                browser.get(f"{server.url}/#token={TOKEN}")
                status = browser.find_element(By.ID, "status")
                _until(lambda: status.text.startswith("ready"), 15, "the page to load /api/info")
                Select(browser.find_element(By.ID, "reference")).select_by_value("upload")
                browser.find_element(By.ID, "reference-file").send_keys(str(reference))
                Select(browser.find_element(By.ID, "voice")).select_by_value("upload")
                browser.find_element(By.ID, "voice-file").send_keys(str(voice))
                browser.find_element(By.ID, "start").click()
                _until(lambda: status.text.startswith("in a call"), 20, f"the call to start (status: {status.text})")
                assert server.app[REGISTRY].active == 1

                def playing() -> bool:
                    t, frames = browser.execute_script(
                        "const v = document.getElementById('video');"
                        "return [v.currentTime, v.getVideoPlaybackQuality().totalVideoFrames];"
                    )
                    return t >= 3.0 and frames >= 50

                _until(playing, 40, "3 s of video to play")
                stats = _until(lambda: browser.execute_script("return window.dystream.stats"), 5, "statistics")
                stats = _until(
                    lambda: (s := browser.execute_script("return window.dystream.stats"))["frames_sent"] >= 50 and s,
                    10,
                    "the statistics to count the frames",
                )
                assert stats["state"] == "live" and stats["voice"] == "wav" and stats["clock"] == "partner"
                assert stats["latency_s"]["median"] > 0 and stats["first_frame_delay_s"] is not None
                table = browser.find_element(By.ID, "stats").text
                assert "frames sent" in table and "audio in → frame out" in table
                if os.environ.get("DYSTREAM_SCREENSHOT"):
                    browser.save_screenshot(os.environ["DYSTREAM_SCREENSHOT"])
                video_size = browser.execute_script(
                    "const v = document.getElementById('video'); return [v.videoWidth, v.videoHeight];"
                )
                assert video_size == [32, 32]
                browser.find_element(By.ID, "stop").click()
                _until(lambda: server.app[REGISTRY].active == 0, 10, "stopping to free the call")
                _until(lambda: status.text == "call ended", 5, "the page to show the end")
                assert np.isfinite(stats["latency_s"]["p95"])

                # a second call: a built-in reference, the voice played by the page into a second track
                Select(browser.find_element(By.ID, "reference")).select_by_value("name:synthetic-2")
                Select(browser.find_element(By.ID, "voice")).select_by_value("track")
                browser.find_element(By.ID, "voice-file").send_keys(str(voice))
                browser.find_element(By.ID, "start").click()
                _until(lambda: status.text.startswith("in a call"), 20, f"the second call (status: {status.text})")

                def own_voice_arrives() -> dict | None:
                    s = browser.execute_script("return window.dystream.stats")
                    return s if s and s["voice"] == "track" and s["own_voice_in_s"] > 0.5 and s["frames_sent"] else None

                stats = _until(own_voice_arrives, 20, "the second track's audio at the server")
                assert stats["clock"] == "partner"
                browser.find_element(By.ID, "stop").click()
                _until(lambda: server.app[REGISTRY].active == 0, 10, "stopping to free the second call")
            finally:
                browser.quit()
    finally:
        torch.set_num_threads(threads)
