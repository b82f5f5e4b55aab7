"""``GET /dashboard`` in a real browser: Debian's headless Chromium, driven by Selenium through
Debian's chromedriver, loads the page from a server process while a worker thread trains, and
the test reads what the page's script rendered: the session's row, the loss chart's points,
the push-latency chart, the metric names as text (never markup), the token prompt when the
server has tokens, the token kept in sessionStorage and never in a URL. Screenshots go to
``$PARAMSERVER_ARTIFACTS`` (default ``.ci/artifacts``), which CI keeps.

Chromium and chromedriver come from Debian's packages (``.ci/run`` installs them; a browser
downloaded by Playwright or Selenium Manager cannot be fetched here): where they or Selenium
are missing the tests skip, except under CI, where they fail.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from paramserver.client import Client
from tests.harness.optional import IN_CI
from tests.harness.servers import REPO, ServerProcess, start_paramserver

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("PARAMSERVER_ARTIFACTS") or REPO / ".ci" / "artifacts")
#: The page's sessionStorage key (dashboard.js).
TOKEN_KEY = "paramserver.dashboard.token"
#: A metric name that would be markup if the page did not escape it (session ids cannot be:
#: paramserver.codes.SESSION_ID_RULE allows only [A-Za-z0-9._-]).
MARKUP_METRIC = '<img src=x onerror="document.title=1"><b>acc</b> & "q"'
#: A session id that shows the page URL-escapes ids and keeps them verbatim.
SESSION_ID = "run-1.lr_0.01"
WAIT_SECONDS = 20.0


def _missing() -> str | None:
    """What the browser tests lack here, or None."""
    if importlib.util.find_spec("selenium") is None:
        return "needs selenium (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"needs Debian's {package} at {path} (apt-get install chromium chromium-driver)"
    return None


MISSING = _missing()
if MISSING is not None and IN_CI:
    raise RuntimeError(f"{MISSING}: .ci/run installs it in CI")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

if MISSING is None:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement
    from selenium.webdriver.support.ui import Select, WebDriverWait


# --- the browser --------------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium with a fresh profile and no network of its own (the machine's is
    closed: background fetches, QUIC and component updates only make it wait)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1100",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager (which would download one) never runs.
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: WebDriver, what: str, condition: Callable[[WebDriver], Any]) -> Any:
    """``condition``'s first truthy value within WAIT_SECONDS; else fail, saying ``what``."""
    try:
        return WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.1).until(condition)
    except TimeoutException:
        screenshot(driver, "failed-" + what.replace(" ", "-")[:40])
        status = driver.find_element(By.ID, "status").text
        pytest.fail(f"the page did not show {what} within {WAIT_SECONDS} s (status: {status!r})")


def visible(driver: WebDriver, element_id: str) -> WebElement | None:
    element = driver.find_element(By.ID, element_id)
    return element if element.is_displayed() else None


#: What the page rendered for one session, read in one script run (the page redraws its
#: charts every poll: elements found one by one could be replaced in between).
_RENDERED = """
const id = arguments[0];
const of = (selector) =>
  [...document.querySelectorAll(selector)].find((e) => e.dataset.sessionId === id);
const row = of("#sessions-body tr");
const card = of("#charts article.card");
const chart = (kind) => {
  const svg = card.querySelector(`.${kind} svg`);
  return {
    points: Number(svg.dataset.points),
    caption: card.querySelector(`.${kind} .caption-text`).textContent,
    legend: card.querySelector(`.${kind} .legend`).textContent,
    lines: [...svg.querySelectorAll("polyline")].map((line) => ({
      name: line.dataset.name,
      points: Number(line.dataset.points),
      drawn: line.getAttribute("points").trim().split(/\\s+/).length,
    })),
  };
};
return {
  row: row && {
    classes: row.className,
    cells: Object.fromEntries([...row.children].map((c) => [c.dataset.field, c.textContent])),
  },
  card: card && {
    title: card.querySelector("h3").textContent,
    metric: chart("metric-chart"),
    latency: chart("latency-chart"),
    options: [...card.querySelectorAll("select option")].map((o) => o.textContent),
    selected: card.querySelector("select").value,
  },
};
"""


def rendered(driver: WebDriver, session_id: str) -> dict[str, Any]:
    """``{"row": {"classes", "cells": {field: text}}, "card": {"title", "metric", "latency",
    "options", "selected"}}`` for ``session_id`` (``None`` for what is not on the page); a
    chart is ``{"points", "caption", "legend", "lines": [{"name", "points", "drawn"}]}``."""
    return dict(driver.execute_script(_RENDERED, session_id))


def metric_points(driver: WebDriver, session_id: str, name: str = "loss") -> int:
    """The points of metric ``name`` the page charts for ``session_id`` (0 if another)."""
    card = rendered(driver, session_id)["card"]
    if card is None or [line["name"] for line in card["metric"]["lines"]] != [name]:
        return 0
    return int(card["metric"]["points"])


def pick_metric(driver: WebDriver, session_id: str, name: str) -> None:
    for card in driver.find_elements(By.CSS_SELECTOR, "#charts article.card"):
        if card.get_attribute("data-session-id") == session_id:
            Select(card.find_element(By.CSS_SELECTOR, "select")).select_by_visible_text(name)


def screenshot(driver: WebDriver, name: str) -> Path:
    """The whole page, beyond the window, as ARTIFACTS/dashboard-NAME.png (CI keeps them)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}.png"
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"screenshot: {path}")
    return path


def console_errors(driver: WebDriver) -> list[str]:
    """The page's console errors: script errors and Content-Security-Policy refusals (what
    the server's CSP would block shows up here), less the 401s the token test causes."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and "401 (Unauthorized)" not in entry["message"]
    ]


# --- the worker ---------------------------------------------------------------------------------


@contextlib.contextmanager
def training(url: str, session_id: str, *, token: str | None = None) -> Iterator[list[int]]:
    """A worker thread pushing to a new Adam session ``session_id`` every ~20 ms with a
    falling loss and a second metric whose name is markup; yields the pushes done so far."""
    done = [0]
    stop = threading.Event()
    failure: list[BaseException] = []
    client = Client(url, token=token)
    session = client.create_session({"w": np.zeros(8, np.float32)}, "adam", session_id)

    def work() -> None:
        rng = np.random.default_rng(0)
        try:
            while not stop.is_set():
                step = done[0]
                loss = 2.0 / (1.0 + 0.05 * step) + 0.02 * float(rng.random())
                grads = {"w": rng.standard_normal(8).astype(np.float32)}
                session.push(grads, metrics={"loss": loss, MARKUP_METRIC: step / 100})
                done[0] += 1
                stop.wait(0.02)
        except BaseException as error:  # shown by the test, not lost in the thread
            failure.append(error)

    thread = threading.Thread(target=work, name=f"worker-{session_id}", daemon=True)
    thread.start()
    try:
        yield done
    finally:
        stop.set()
        thread.join(timeout=10)
        client.close()
    if failure:
        raise failure[0]


# --- the tests ----------------------------------------------------------------------------------


def test_dashboard_shows_a_training_session(browser: WebDriver, tmp_path: Path) -> None:
    with start_paramserver(tmp_path) as server, training(server.url, SESSION_ID) as pushes:
        with Client(server.url) as client:  # a second session that nobody pushes to
            client.create_session([np.zeros(3, np.float32)], "sgd", "idle")
        wait_for(browser, "a first push", lambda _: pushes[0] > 0)
        browser.get(f"{server.url}/dashboard")

        wait_for(browser, "the session's row", lambda d: rendered(d, SESSION_ID)["row"])
        wait_for(browser, "a loss chart with points", lambda d: metric_points(d, SESSION_ID) > 5)
        # latency: a history of the polls' p50 and p99, ~2 s apart
        wait_for(
            browser,
            "a latency chart",
            lambda d: rendered(d, SESSION_ID)["card"]["latency"]["points"] >= 4,
        )
        page = rendered(browser, SESSION_ID)
        cells, card = page["row"]["cells"], page["card"]
        assert cells["id"] == card["title"] == SESSION_ID
        assert cells["optimizer"] == "Adam"
        assert cells["mode"] == "async"
        assert int(cells["iterations"].replace(",", "")) > 0
        assert cells["age"].endswith("s ago")
        assert cells["p50"].endswith("ms")
        assert "idle" not in page["row"]["classes"]
        idle = rendered(browser, "idle")
        assert "idle" in idle["row"]["classes"]
        assert idle["row"]["cells"]["age"] == "never"
        assert idle["card"]["metric"]["points"] == 0

        # what the script drew: one polyline per series, of as many points as it says
        [loss] = card["metric"]["lines"]
        assert loss["name"] == "loss" and loss["drawn"] == loss["points"] > 5
        assert card["metric"]["caption"] == "loss by iteration"
        assert [line["name"] for line in card["latency"]["lines"]] == ["p50", "p99"]
        assert all(line["drawn"] == line["points"] >= 2 for line in card["latency"]["lines"])
        assert card["latency"]["legend"].startswith("p50 ") and " ms" in card["latency"]["legend"]

        # the metric names are text: the markup one is an option's label, no element of it
        assert sorted(card["options"]) == sorted(["loss", MARKUP_METRIC])
        assert card["selected"] == "loss"
        assert browser.find_elements(By.CSS_SELECTOR, "main img, main b") == []
        assert browser.title == "paramserver dashboard"  # its onerror never ran

        # picking the other metric charts it, fetched from the start; then back to the loss
        pick_metric(browser, SESSION_ID, MARKUP_METRIC)
        wait_for(
            browser, "the other metric", lambda d: metric_points(d, SESSION_ID, MARKUP_METRIC) > 5
        )
        caption = rendered(browser, SESSION_ID)["card"]["metric"]["caption"]
        assert caption == f"{MARKUP_METRIC} by iteration"
        pick_metric(browser, SESSION_ID, "loss")
        wait_for(browser, "the loss again", lambda d: metric_points(d, SESSION_ID) > 5)
        # the page keeps polling: the chart grows while the worker trains
        before = metric_points(browser, SESSION_ID)
        wait_for(browser, "new points", lambda d: metric_points(d, SESSION_ID) > before)
        screenshot(browser, "training")

        # the log scale applies to both charts at once
        for card_element in browser.find_elements(By.CSS_SELECTOR, "#charts article.card"):
            if card_element.get_attribute("data-session-id") == SESSION_ID:
                card_element.find_element(By.CSS_SELECTOR, "input[type=checkbox]").click()
        wait_for(
            browser,
            "log scales",
            lambda d: all(
                rendered(d, SESSION_ID)["card"][chart]["caption"].endswith("(log scale)")
                for chart in ("metric", "latency")
            ),
        )
        assert console_errors(browser) == []


def test_dashboard_asks_for_a_token_and_keeps_it_out_of_urls(
    browser: WebDriver, tmp_path: Path
) -> None:
    writer, reader = "dashboard-writer-secret", "dashboard-reader-secret"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{writer}\n{reader}:ro\n", encoding="utf-8")
    server: ServerProcess
    with (
        start_paramserver(tmp_path, tokens_file=tokens) as server,
        training(server.url, SESSION_ID, token=writer),
    ):
        browser.get(f"{server.url}/dashboard")  # the page itself needs no token
        prompt = wait_for(browser, "the token prompt", lambda d: visible(d, "token-prompt"))
        assert "bearer token" in prompt.text
        assert not browser.find_element(By.ID, "sessions-section").is_displayed()
        screenshot(browser, "token-prompt")

        # a wrong token: refused, asked again, not kept
        field = browser.find_element(By.ID, "token-input")
        assert field.get_attribute("type") == "password"
        field.send_keys("not-a-token")
        browser.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
        wait_for(
            browser,
            "the prompt again",
            lambda d: (
                "refused" in d.find_element(By.ID, "token-message").text
                and visible(d, "token-prompt")
            ),
        )
        assert browser.execute_script(f"return sessionStorage.getItem('{TOKEN_KEY}')") is None

        # the read-only token: the table renders, the token lives in sessionStorage only
        browser.find_element(By.ID, "token-input").send_keys(reader)
        browser.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
        wait_for(browser, "a loss chart with points", lambda d: metric_points(d, SESSION_ID) > 1)
        assert rendered(browser, SESSION_ID)["row"]["cells"]["id"] == SESSION_ID
        assert not browser.find_element(By.ID, "token-prompt").is_displayed()
        assert browser.execute_script(f"return sessionStorage.getItem('{TOKEN_KEY}')") == reader
        assert browser.execute_script("return localStorage.length") == 0
        assert browser.execute_script("return document.cookie") == ""
        assert reader not in browser.current_url
        assert browser.current_url == f"{server.url}/dashboard"
        assert browser.find_element(By.ID, "token-input").get_attribute("value") == ""
        screenshot(browser, "with-token")

        # forgetting it asks again and clears it
        browser.find_element(By.ID, "forget-token").click()
        wait_for(browser, "the prompt after forgetting", lambda d: visible(d, "token-prompt"))
        assert browser.execute_script(f"return sessionStorage.getItem('{TOKEN_KEY}')") is None
        assert console_errors(browser) == []
    # The server's access log has every request line the page made: the data was asked for
    # (401 without a token, 200 with one), and no token was ever part of a path or a query.
    time.sleep(0.2)
    log = server.log
    assert '"GET /stats HTTP/1.1" 401' in log and '"GET /stats HTTP/1.1" 200' in log
    assert "GET /sessions/run-1.lr_0.01/metrics?name=loss&since_iterations=" in log
    for secret in (reader, writer, "not-a-token"):
        assert secret not in log
