"""End to end: the real `tokenprobe app` on loopback, driven in headless Chromium.

Needs Debian's `chromium` and `chromium-driver` (`make test` installs them with apt-get) and
selenium; fails, saying which is missing, without them (deselect with -m "not browser").
Screenshots go to
$TOKENPROBE_ARTIFACTS (default tests/artifacts/).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import require_tool

import tokenprobe
from tokenprobe.analyses import views

pytestmark = pytest.mark.browser
ARTIFACTS = Path(os.environ.get("TOKENPROBE_ARTIFACTS", Path(__file__).parent / "artifacts"))
PROMPT = "The cat sat on the mat.\nThen it rained."


@pytest.fixture()
def chromium() -> tuple[str, str]:
    """Paths of Debian's chromium and chromedriver; fails, saying what is missing, without."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/lib/chromium/chromedriver" if Path("/usr/lib/chromium/chromedriver").exists()
        else None)
    require_tool("Debian's chromium and chromium-driver", browser and driver, "browser")
    return browser, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"tokenprobe app exited with {proc.returncode}: "
                                 f"{proc.stdout.read()}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"tokenprobe app did not answer at {url} in {timeout} s")


@pytest.fixture()
def server(chromium, tmp_path, tiny_llama):
    """`tokenprobe app ROOT --port P` serving a runs root holding the run `demo`."""
    tokenprobe.run(tiny_llama, [PROMPT, "Hi!"], out=tmp_path / "demo", progress=False)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tokenprobe.cli", "app", str(tmp_path),
                             "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        yield url, tokenprobe.open_run(tmp_path / "demo")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def headless_driver(chromium, size: str):
    """A headless Chromium WebDriver of window `size` ("W,H"); the artifacts folder made."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={size}"]:
        options.add_argument(flag)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_dashboard_in_headless_chromium(chromium, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, run = server
    driver = headless_driver(chromium, "1500,1300")
    try:
        driver.get(f"{url}/?run=demo")
        wait = WebDriverWait(driver, 60)
        shown = "".join(views.prompt_tokens(run, 0).shown)
        token_view = wait.until(lambda d: next(
            (e for e in d.find_elements(By.CSS_SELECTOR, ".tp-tokens")
             if "".join(e.text.split()) == "".join(shown.split())), False))
        spans = token_view.find_elements(By.CSS_SELECTOR, ".tp-tok")
        assert len(spans) == int(run.prompts.n_tokens[0])
        assert "entropy" in spans[1].get_attribute("title")
        driver.save_screenshot(str(ARTIFACTS / "dashboard_tokens.png"))
        for tab, name in [("Heads", "dashboard_heads.png"), ("Layers", "dashboard_layers.png")]:
            wait.until(lambda d: next((t for t in d.find_elements(By.CSS_SELECTOR, "[role='tab']")
                                       if t.text.strip() == tab), False)).click()
            wait.until(lambda d: any(p.is_displayed() and p.find_elements(
                By.CSS_SELECTOR, ".heatmaplayer image")
                for p in d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")))
            driver.save_screenshot(str(ARTIFACTS / name))
        assert not driver.find_elements(By.CSS_SELECTOR, "[data-testid='stException']")
    finally:
        driver.quit()


def test_head_pattern_in_headless_chromium(chromium, server):
    """The Heads tab's on-demand pattern: toggled on, the query x key heatmap and the tokens
    coloured by what the last query attends to render (screenshot dashboard_head_pattern.png)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, run = server
    driver = headless_driver(chromium, "1500,2000")
    try:
        driver.get(f"{url}/?run=demo")
        wait = WebDriverWait(driver, 90)
        wait.until(lambda d: next((t for t in d.find_elements(By.CSS_SELECTOR, "[role='tab']")
                                   if t.text.strip() == "Heads"), False)).click()
        wait.until(lambda d: next((e for e in d.find_elements(
            By.CSS_SELECTOR, "[data-testid='stCheckbox'] label")
            if e.is_displayed() and "Compute it with" in e.text), False)).click()
        heatmap = wait.until(lambda d: next((p for p in d.find_elements(
            By.CSS_SELECTOR, ".js-plotly-plot") if p.is_displayed()
            and "head 0" in p.text and p.find_elements(By.CSS_SELECTOR, ".heatmaplayer image")),
            False))
        assert "query" in heatmap.text and "key" in heatmap.text and "sink" in heatmap.text
        n = int(run.prompts.n_tokens[0])
        view = wait.until(lambda d: next((e for e in d.find_elements(By.CSS_SELECTOR, ".tp-tokens")
                                          if e.is_displayed() and e.find_elements(
                                              By.CSS_SELECTOR, f".tp-tok[data-pos='{n - 1}']")
                                          and "attention from query" in e.find_element(
                                              By.XPATH, "..").text), False))
        spans = view.find_elements(By.CSS_SELECTOR, ".tp-tok")
        assert len(spans) == n and "attention from query" in spans[0].get_attribute("title")
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", view)
        driver.save_screenshot(str(ARTIFACTS / "dashboard_head_pattern.png"))
        assert not driver.find_elements(By.CSS_SELECTOR, "[data-testid='stException']")
    finally:
        driver.quit()
