"""The live page in a real headless Chromium: tokens stream in and the chart moves."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from test_server import RunningServer

pytestmark = pytest.mark.model

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("the page test needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="livepp-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def chart_signature(driver):
    # A cheap fingerprint of the canvas pixels, to see that the chart redraws.
    return driver.execute_script("return document.getElementById('chart').toDataURL().length")


def test_page_streams_tokens_and_updates_chart(decoder, browser):
    server = RunningServer(decoder)
    try:
        open_page(browser, server)
        empty_chart = chart_signature(browser)
        browser.find_element("id", "max").clear()
        browser.find_element("id", "max").send_keys("40")
        browser.find_element("id", "thr").send_keys("50")
        browser.find_element("id", "go").click()
        wait_for(lambda: len(browser.find_elements("css selector", "#answer span.t")) >= 5, "tokens on the page")
        mid_chart = chart_signature(browser)
        wait_for(lambda: "end:" in browser.find_element("id", "log").text, "the end event", timeout=120)
        spans = browser.find_elements("css selector", "#answer span.t")
        n_tokens = int(browser.find_element("id", "s-n").text)
        assert len(spans) == n_tokens > 5
        assert browser.find_element("id", "s-ppl").text not in ("", "–")
        assert spans[0].get_attribute("style").startswith("background")
        assert chart_signature(browser) != empty_chart and mid_chart != empty_chart
        ARTIFACTS.mkdir(exist_ok=True)
        # Hover a token so the screenshot shows the tooltip with alternatives.
        from selenium.webdriver import ActionChains

        ActionChains(browser).move_to_element(spans[min(3, len(spans) - 1)]).perform()
        time.sleep(0.2)
        assert "logprob" in browser.find_element("id", "tip").text
        browser.save_screenshot(str(ARTIFACTS / "page.png"))
    finally:
        server.stop()


def wait_for(condition, what, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if condition():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def open_page(browser, server, mode=None):
    """The page of ``server``, once its websocket is connected, in ``mode`` if given."""
    browser.get(f"http://127.0.0.1:{server.port}/")
    wait_for(lambda: browser.find_element("id", "conn").text == "connected", "websocket connection")
    if mode is not None:
        from selenium.webdriver.support.ui import Select

        Select(browser.find_element("id", "mode")).select_by_value(mode)


def test_generate_is_enabled_again_after_a_reconnect_mid_generation(decoder, browser):
    server = RunningServer(decoder)
    try:
        open_page(browser, server)
        browser.find_element("id", "max").clear()
        browser.find_element("id", "max").send_keys("200")
        browser.find_element("id", "go").click()
        wait_for(lambda: len(browser.find_elements("css selector", "#answer span.t")) >= 2, "tokens on the page")
        assert not browser.find_element("id", "go").is_enabled()
        browser.execute_script("ws.close()")  # the connection drops mid-generation; its end never comes
        wait_for(lambda: browser.find_element("id", "conn").text == "connected", "the reconnection", timeout=30)
        assert browser.find_element("id", "go").is_enabled()
        assert not browser.find_element("id", "stop").is_enabled()
    finally:
        server.stop()


def test_route_mode_shows_short_stage_decision_long_stage_and_answer(decoder, browser, tmp_path):
    from livepp.car.calibration import Calibration

    always = tmp_path / "always.json"  # a threshold no posterior reaches: every question goes long
    Calibration(decoder.loaded.name, "log_ppl", 0.1, 0.02, 0.5, 0.02, 0.5, 0.999999, 10, 10).save(always)
    server = RunningServer(decoder, calibration=str(always))
    try:
        open_page(browser, server, mode="route")
        assert browser.find_element("id", "go").text == "Route"
        browser.find_element("id", "prompt").clear()
        browser.find_element("id", "prompt").send_keys("What is 6 + 7?")
        browser.find_element("id", "max").clear()
        browser.find_element("id", "max").send_keys("16")
        browser.find_element("id", "logy").click()
        browser.find_element("id", "go").click()
        wait_for(lambda: browser.find_element("id", "final").is_displayed(), "the final answer", timeout=180)
        stages = [e.text for e in browser.find_elements("css selector", "#answer .stage")]
        assert [s.split(" ·")[0].lower() for s in stages] == ["short answer", "long answer"]
        decision = browser.find_element("id", "decision").text
        assert "route to long reasoning" in decision and "P(correct)" in decision and "threshold 0.999999" in decision
        final = browser.find_element("id", "final").text
        assert final.startswith("answer (long):") and "tokens: short" in final
        short_n, long_n = (int(x) for x in final.split("tokens: short ")[1].split(" = ")[0].split(" + long "))
        assert len(browser.find_elements("css selector", "#answer span.t")) == short_n + long_n and long_n == 16
        assert browser.find_element("id", "go").is_enabled()
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "page-route.png"))
    finally:
        server.stop()


def test_page_shows_the_services_load_and_live_requests(decoder, browser):
    import json
    import threading

    from websockets.sync.client import connect

    server = RunningServer(decoder, max_batch=2, max_queue=4)
    from test_server import send

    done = threading.Event()

    def traffic():
        # Three requests from another client: two run, one waits.
        with connect(server.url) as ws:
            for i in range(3):
                send(ws, type="generate", id=f"bg{i}", prompt="Write a long essay about the sea.", params={"max_new_tokens": 200, "ignore_eos": True})
            ends = 0
            while ends < 3 and not done.is_set():
                try:
                    ends += json.loads(ws.recv(timeout=1))["type"] == "end"
                except TimeoutError:
                    pass
            for i in range(3):
                send(ws, type="cancel", id=f"bg{i}")

    worker = threading.Thread(target=traffic, daemon=True)
    try:
        browser.get(f"http://127.0.0.1:{server.port}/")
        worker.start()
        wait_for(lambda: browser.find_element("id", "svc").text == "service: 2 running · 1 queued · batch 2/2", "the load in the header", timeout=60)
        # The page rebuilds the table every poll: read it whole, in one script
        # call, so no element goes stale between finding and reading it.
        def table():
            return browser.execute_script(
                "return [...document.querySelectorAll('#live-rows tr')].map(r => [...r.cells].map(c => c.textContent))")

        def complete(snapshot):
            generating = [r for r in snapshot if "generating" in r]
            return len(snapshot) == 3 and len(generating) == 2 and all(r[4] != "–" for r in generating)

        seen: list[list[list[str]]] = []

        def ready() -> bool:
            seen.append(table())
            return complete(seen[-1])

        wait_for(ready, "two generating requests with their PPL and one waiting", timeout=60)
        snapshot = seen[-1]
        cells = [r for r in snapshot if "generating" in r]
        # which two of the three got the batch depends on thread scheduling
        waiting = [r[0] for r in snapshot if "waiting" in r]
        assert len(waiting) == 1 and sorted([c[0] for c in cells] + waiting) == ["bg0", "bg1", "bg2"]
        assert {c[1] for c in cells} == {"generate"}
        assert all(int(c[3]) >= 1 and float(c[4]) >= 1.0 for c in cells)
        browser.save_screenshot(str(ARTIFACTS / "page-live.png"))
    finally:
        done.set()
        worker.join(30)
        server.stop()


def test_page_marks_reasoning_steps_and_the_worst_one(decoder, browser):
    server = RunningServer(decoder)
    try:
        open_page(browser, server)
        prompt = browser.find_element("id", "prompt")
        prompt.clear()
        prompt.send_keys("List three facts about the moon, one per line, numbered 1., 2., 3.")
        browser.find_element("id", "max").clear()
        browser.find_element("id", "max").send_keys("60")
        browser.find_element("id", "steps").click()
        before = chart_signature(browser)
        browser.find_element("id", "go").click()
        wait_for(lambda: "end:" in browser.find_element("id", "log").text, "the end event", timeout=120)
        steps = browser.execute_script("return steps")
        assert len(steps) >= 2
        # the steps tile the answer's tokens, and the worst is the one with the highest PPL
        n_tokens = int(browser.find_element("id", "s-n").text)
        assert steps[0][0] == 0 and steps[-1][1] == n_tokens - 1
        assert all(b[0] == a[1] + 1 for a, b in zip(steps, steps[1:]))
        worst = browser.execute_script("return worstStep()")
        assert steps[worst][2] == max(s[2] for s in steps)
        assert "step 0 (tokens 0–" in browser.find_element("id", "log").text
        assert chart_signature(browser) != before
        browser.save_screenshot(str(ARTIFACTS / "page-steps.png"))
    finally:
        server.stop()


def test_watch_mode_scores_typed_text_as_it_arrives(decoder, browser):
    from click.testing import CliRunner

    from livepp.cli.main import main
    from livepp.engines.torch.engine import TorchEngine

    prompt, text = "Why do cats purr?", "Cats purr when they are content, and sometimes when they are hurt or anxious."
    r = CliRunner().invoke(main, ["score", "--prompt", prompt, "--target", text, "--chat", "--json"], obj={"engine": TorchEngine(decoder)})
    reference = json.loads(r.stdout)
    server = RunningServer(decoder)
    try:
        open_page(browser, server, mode="watch")
        assert browser.find_element("id", "go").text == "Watch" and browser.find_element("id", "watch").is_displayed()
        browser.find_element("id", "prompt").clear()
        browser.find_element("id", "prompt").send_keys(prompt)
        box = browser.find_element("id", "watch")
        box.send_keys(text[:20])
        browser.find_element("id", "go").click()
        box.send_keys(text[20:])  # typed while the request runs: sent as it is typed
        wait_for(lambda: len(browser.execute_script("return points")) >= len(reference["tokens"]) - 3, "tokens of the typed text")
        browser.find_element("id", "stop").click()  # "End text"
        wait_for(lambda: "end: eos" in browser.find_element("id", "log").text, "the end event", timeout=60)
        points = browser.execute_script("return points")
        assert len(points) == len(reference["tokens"])
        assert points[-1][1] == pytest.approx(reference["ppl"], rel=1e-4)
        assert browser.find_element("id", "answer").text == text
        browser.save_screenshot(str(ARTIFACTS / "page-watch.png"))
    finally:
        server.stop()


def test_score_mode_shows_a_pasted_texts_surprisal_and_ppl(decoder, browser):
    from click.testing import CliRunner

    from livepp.cli.main import main
    from livepp.engines.torch.engine import TorchEngine

    text = (Path("/usr/share/common-licenses/GPL-3").read_text() if Path("/usr/share/common-licenses/GPL-3").is_file()
            else "The quick brown fox jumps over the lazy dog. " * 40)[:1500]
    r = CliRunner().invoke(main, ["score", "-", "--json"], input=text, obj={"engine": TorchEngine(decoder)})
    reference = json.loads(r.stdout)
    server = RunningServer(decoder)
    try:
        open_page(browser, server, mode="score")
        assert browser.find_element("id", "go").text == "Score" and browser.find_element("id", "watch").is_displayed()
        browser.find_element("id", "prompt").clear()
        browser.execute_script("document.getElementById('watch').value = arguments[0]", text)  # pasted
        browser.find_element("id", "go").click()
        wait_for(lambda: "end: done" in browser.find_element("id", "log").text, "the end event", timeout=120)
        assert int(browser.find_element("id", "s-n").text) == reference["n_tokens"]
        assert float(browser.find_element("id", "s-ppl").text) == pytest.approx(reference["ppl"], abs=0.006)
        points = browser.execute_script("return points")
        assert len(points) == reference["n_tokens"] and points[-1][1] == pytest.approx(reference["ppl"], rel=1e-4)
        browser.save_screenshot(str(ARTIFACTS / "page-score.png"))
    finally:
        server.stop()
