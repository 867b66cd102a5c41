"""The chat page at GET /, in a real headless Chromium: type a question, watch the answer stream in.

Needs Debian's chromium and chromium-driver (.ci/run installs them). Without them the test skips
locally, and fails in CI (CI=true), where they must be present.
"""
import contextlib
import os
import shutil
import subprocess
import sys
import time

import pytest

from zephyr.testing.processes import free_port, interrupt

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Chromium's own network traffic is refused on this machine's closed network: turn it off.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1000,800"]


def _missing():
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = _missing()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test must run in CI, but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server_url(smollm2_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "zephyr.cli", "serve", str(smollm2_path), "--port", str(port),
                                "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "zephyr serve did not start in 60 s"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        yield url
    finally:
        interrupt(process, 15)


def test_a_question_typed_into_the_page_gets_a_streamed_answer(browser, server_url, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server_url + "/")
    assert browser.title == "zephyr chat"
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text.endswith(".gguf"))

    browser.find_element(By.CSS_SELECTOR, "details summary").click()
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys("24")

    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("What is the capital of France? Answer in one sentence.")
    prompt.send_keys(Keys.ENTER)

    assert WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.user"))
    reply = browser.find_element(By.CSS_SELECTOR, ".message.assistant")
    WebDriverWait(browser, 180, poll_frequency=0.2).until(lambda d: reply.get_attribute("data-state") != "streaming")
    browser.save_screenshot(str(tmp_path / "chat.png"))
    assert reply.get_attribute("data-state") == "done", browser.find_element(By.ID, "messages").text
    assert "Paris" in reply.text
    assert int(reply.get_attribute("data-chunks")) > 1   # it arrived in pieces, not all at once
    assert browser.find_element(By.ID, "send").is_displayed()

    # A follow-up in the same conversation is answered too (the page sends the history).
    prompt.send_keys("Thanks!")
    prompt.send_keys(Keys.ENTER)
    WebDriverWait(browser, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant")) == 2)
    second = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[1]
    WebDriverWait(browser, 180, poll_frequency=0.2).until(lambda d: second.get_attribute("data-state") != "streaming")
    assert second.get_attribute("data-state") == "done" and second.text.strip()

    # Stop: the page aborts the request, and the server stops generating.
    tokens.clear()
    tokens.send_keys("400")
    prompt.send_keys("Write a long story about a dragon.")
    prompt.send_keys(Keys.ENTER)
    WebDriverWait(browser, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant")) == 3)
    third = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[2]
    WebDriverWait(browser, 120, poll_frequency=0.1).until(lambda d: int(third.get_attribute("data-chunks")) >= 2)
    browser.find_element(By.ID, "stop").click()
    WebDriverWait(browser, 10).until(lambda d: third.get_attribute("data-state") == "stopped")
    import httpx
    deadline = time.monotonic() + 10
    while httpx.get(server_url + "/health", timeout=10).json()["requests_in_progress"]:
        assert time.monotonic() < deadline, "the server went on generating after the page pressed Stop"
        time.sleep(0.1)
