"""The playground in a real headless Chromium (Debian's chromium and chromium-driver, driven by
selenium): greedy text equal to gRPC's, keyboard submit, a session continued and forked, an
error for a bad setting, a narrow window, and a screenshot kept in the test's directory.

Skips, saying why, where Chromium, its driver or selenium is missing (.ci/run installs them).
Nothing is downloaded: the driver's path is given, so selenium's own driver manager never runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest

from server.background import BackgroundServer
from server.clients.client import CharstreamClient
from server.config import ServerConfig

BROWSERS = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVERS = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,900")
WAIT_SECONDS = 60


def first_present(paths: tuple[str, ...], name: str) -> str:
    found = next((path for path in paths if Path(path).is_file()), None) or shutil.which(name)
    if found is None:
        pytest.skip(f"no {name} installed (Debian: apt-get install chromium chromium-driver)")
    return found


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[BackgroundServer]:
    with BackgroundServer(ServerConfig(model=str(tiny_model_dir), port=0, http_port=0, device="cpu",
                                       max_sessions=16)) as running:
        yield running


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):  # yields selenium's WebDriver (imported only here)
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra)")
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = first_present(BROWSERS, "chromium"), first_present(DRIVERS, "chromedriver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")  # fresh every run
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


class Page:
    """The playground's controls, by the ids index.html gives them."""

    def __init__(self, driver, url: str):  # driver: the `browser` fixture's WebDriver
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.by = driver, By
        self.wait = WebDriverWait(driver, WAIT_SECONDS)
        driver.get(url)
        self.wait.until(lambda d: self.text("model") not in ("", "connecting…"))

    def element(self, element_id: str):  # -> selenium's WebElement
        return self.driver.find_element(self.by.ID, element_id)

    def text(self, element_id: str) -> str:
        return self.element(element_id).text

    def fill(self, **values: object) -> None:
        for name, value in values.items():
            field = self.element(name.replace("_", "-"))
            field.clear()
            field.send_keys(str(value))

    def click(self, element_id: str) -> None:
        self.element(element_id).click()

    def finished(self) -> str:
        """Wait for the action under way to end; its state: done, error or stopped."""
        self.wait.until(lambda d: self.element("status").get_attribute("data-state") != "streaming"
                        and self.element("generate").is_enabled())
        return self.element("status").get_attribute("data-state")

    def generate(self) -> str:
        self.driver.execute_script("document.getElementById('status').dataset.state = 'streaming'")
        self.click("generate")
        return self.finished()

    def generated(self) -> list[str]:
        """The text of each generation shown, in order (prompts are shown apart)."""
        return [span.get_attribute("textContent") for span in self.driver.find_elements(self.by.CSS_SELECTOR, "#output .gen")]


def test_the_playground_streams_greedy_text_continues_forks_and_shows_errors(
        server: BackgroundServer, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.keys import Keys

    with CharstreamClient(server.address) as client:
        greedy = client.generate("To be", 200, temperature=0).text()
        sampled = client.generate("To be", 300, temperature=0.8, seed=5).text()  # as one uninterrupted call

    page = Page(browser, server.running.http.url)  # type: ignore[union-attr]
    assert "GRU" in page.text("model") and "CPU" in page.text("model")

    page.fill(prompt="To be", max_chars=200, temperature=0, top_k=0, top_p=1, seed="")
    assert page.generate() == "done"
    assert page.generated() == [greedy]
    assert page.text("status") == "length" and page.text("ttfc").endswith("ms") and page.text("count") == "200"
    echo = browser.find_elements(page.by.CSS_SELECTOR, "#output .echo")
    assert [span.get_attribute("textContent") for span in echo] == ["To be"]

    # Ctrl+Enter in the prompt box generates too.
    browser.execute_script("document.getElementById('status').dataset.state = 'streaming'")
    page.element("prompt").send_keys(Keys.CONTROL, Keys.ENTER)
    assert page.finished() == "done" and page.generated() == [greedy]

    # A session: the first Generate creates it (seeded), the second continues it.
    page.click("mode-session")
    page.wait.until(lambda d: page.element("session-panel").is_displayed())
    page.fill(prompt="To be", max_chars=100, temperature=0.8, seed=5)
    assert page.generate() == "done"
    assert page.element("prompt").get_property("value") == ""  # the session has the text now
    assert page.generate() == "done"
    assert page.generated() == [sampled[:100], sampled[100:200]]
    assert "205 characters consumed" in page.text("session-info")

    page.click("fork")
    page.wait.until(lambda d: "forked from" in page.text("session-info"))
    assert page.generate() == "done"
    assert page.generated()[-1] == sampled[200:300]  # the fork continues exactly where its source stood
    options = browser.find_elements(page.by.CSS_SELECTOR, "#session-select option")
    assert len([o for o in options if o.get_attribute("value")]) == 2  # the source and its fork
    browser.save_screenshot(str(tmp_path / "playground.png"))

    # A bad setting: the server's message is shown.
    page.fill(temperature=-1)
    assert page.generate() == "error"
    error = page.element("error")
    assert error.is_displayed() and "INVALID_ARGUMENT" in error.text and "temperature must be" in error.text

    # Narrow: one column, nothing wider than the window.
    browser.set_window_size(400, 900)
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    browser.save_screenshot(str(tmp_path / "playground-narrow.png"))
    assert (tmp_path / "playground.png").stat().st_size > 10_000


def test_the_playground_asks_for_an_api_key_and_sends_it(tiny_model_dir: Path, tmp_path: Path, browser) -> None:
    secret = "playground-secret-0123456789"
    keys = tmp_path / "keys.txt"
    keys.write_text(f"tester:{secret}\n")
    config = ServerConfig(model=str(tiny_model_dir), port=0, http_port=0, device="cpu", max_sessions=4,
                          api_keys=str(keys))
    with BackgroundServer(config) as keyed:
        with CharstreamClient(keyed.address, api_key=secret) as client:
            greedy = client.generate("To be", 50, temperature=0).text()
        page = Page(browser, keyed.running.http.url)  # type: ignore[union-attr]
        assert "needs an API key" in page.text("model")
        page.fill(prompt="To be", max_chars=50, temperature=0)
        assert page.generate() == "error"
        assert "UNAUTHENTICATED" in page.text("error") and "API key" in page.text("error")

        page.fill(api_key=secret)
        page.element("temperature").click()  # leaving the key field: the page asks for the model again
        page.wait.until(lambda d: "GRU" in page.text("model"))
        assert page.generate() == "done" and page.generated() == [greedy]
        assert not page.element("error").is_displayed()
