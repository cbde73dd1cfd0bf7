"""The dashboard in a real headless browser (Debian's chromium and
chromium-driver, driven by Selenium) against a real cluster checking
access: an admin logs in, watches counts change as works flow, finds a work
by id, pages through works, cancels a running work and tails results; a
reader sees no cancel button and is refused if it calls the endpoint
anyway. Every page is checked by axe-core (WCAG 2 A and AA: labels,
contrast, landmarks) and photographed, wide and narrow, into the test's
temporary directory."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By

import dworkers
from dworkers import credentials
from dworkers.v1 import frontend_pb2_grpc, work_pb2
from tests.helpers import wait_kind, wait_until

pytestmark = pytest.mark.e2e
AXE = Path(__file__).parent / "browser" / "node_modules" / "axe-core" / "axe.min.js"
WAIT = 60.0  # seconds a page may take to show something (the machine may be loaded)


@pytest.fixture
def board(make_cluster):
    """A cluster checking access, a worker running the control jobs, a
    frontend and a dashboard: (cluster, frontend address, dashboard URL)."""
    cluster = make_cluster(access=True)
    cluster.start_master(wait=True)
    cluster.start_worker(2, "--jobs", "tests.jobs_control")
    front = cluster.start_frontend()
    wait_kind(frontend_pb2_grpc.FrontendStub(credentials.channel(front.address, False,
                                                                 token=cluster.tokens["admin"])), "hold")
    dashboard = cluster.start_dashboard(front.address)
    return cluster, front.address, f"http://{dashboard.address}"


class Page:
    """A headless chromium, with what the tests ask of a page."""

    def __init__(self, shots: Path):
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                         "--window-size=1280,900", "--disable-extensions"):
            options.add_argument(argument)
        service = webdriver.ChromeService(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
        self.driver = webdriver.Chrome(options=options, service=service)
        self.driver.set_script_timeout(WAIT)
        self.shots = shots
        shots.mkdir(parents=True, exist_ok=True)

    def open(self, url: str) -> None:
        self.driver.get(url)

    def text(self, element_id: str) -> str:
        try:
            return self.driver.find_element(By.ID, element_id).text
        except (NoSuchElementException, StaleElementReferenceException):
            return ""

    def texts(self, selector: str) -> list[str]:
        """The text of every element `selector` matches, read at one instant (the page redraws)."""
        return self.driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]), e => e.textContent)", selector)

    def has(self, element_id: str) -> bool:
        return bool(self.driver.find_elements(By.ID, element_id))

    def wait_text(self, element_id: str, predicate, what: str) -> str:
        return wait_until(lambda: (lambda t: t if predicate(t) else "")(self.text(element_id)), WAIT, what)

    def click(self, element_id: str) -> None:
        self.driver.find_element(By.ID, element_id).click()

    def type(self, element_id: str, text: str) -> None:
        field = self.driver.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(text)

    def login(self, base: str, token: str) -> None:
        self.open(base + "/")
        wait_until(lambda: self.driver.current_url.startswith(base + "/login") and self.has("token"), WAIT,
                   "the page to ask for a token")
        self.type("token", token)
        self.click("login")
        wait_until(lambda: not self.driver.current_url.startswith(base + "/login"), WAIT, "the login to pass")

    def shoot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        assert path.stat().st_size > 1000
        return path

    def accessibility_violations(self) -> list[str]:
        """axe-core's WCAG 2 A and AA violations on the page as it is now."""
        if not self.driver.execute_script("return typeof axe !== 'undefined'"):
            self.driver.execute_script(AXE.read_text())
        found = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa']}})"
            "  .then(r => done(r.violations.map(v => v.id + ' (' + v.impact + '): ' + v.help + ' at '"
            "    + v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(', '))))"
            "  .catch(e => done(['axe failed: ' + e]));")
        return list(found)

    def fits_the_width(self) -> bool:
        return self.driver.execute_script(
            "return document.documentElement.scrollWidth <= document.documentElement.clientWidth + 1")

    def quit(self) -> None:
        self.driver.quit()


@pytest.fixture
def page(tmp_path):
    browser = Page(tmp_path / "screenshots")
    yield browser
    browser.quit()


def number(text: str) -> int:
    return int(text.replace(",", "").replace("\u202f", "").replace("\xa0", "") or -1)


def test_an_admin_watches_works_flow_finds_one_and_cancels_a_running_one(board, page, tmp_path):
    cluster, front, base = board
    page.login(base, cluster.tokens["admin"])
    page.wait_text("who-name", lambda t: t == "admin", "the header to name who is logged in")
    done_before = number(page.wait_text("count-DONE", lambda t: t not in ("", "—"), "the overview's counts"))
    with dworkers.Client(front, token=cluster.tokens["admin"], timeout=60) as client:
        stamps = client.submit_many("stamp", [(f"n{i}",) for i in range(40)])
        for handle in stamps:
            handle.result(timeout=60)
        page.wait_text("count-DONE", lambda t: number(t) >= done_before + 40, "the DONE count to rise by 40")
        assert page.text("master").startswith(f"Active: {cluster.active_master().address}")
        page.shoot("overview")
        assert page.accessibility_violations() == []

        # Find one work by its id.
        page.driver.find_element(By.LINK_TEXT, "Works").click()
        wait_until(lambda: page.has("search-id"), WAIT, "the works page")
        page.type("search-id", stamps[3].id)
        page.click("search-open")
        page.wait_text("work-state", lambda t: t == "DONE", "the work's page")
        assert page.driver.current_url == f"{base}/works/{stamps[3].id}"
        assert '"label": "n3"' in page.text("work-result")
        assert not page.has("cancel")  # finished: nothing to cancel
        page.shoot("work-done")
        assert page.accessibility_violations() == []

        # Page through the list, server-side.
        page.open(f"{base}/works?state=DONE&kind=stamp&page_size=20")
        wait_until(lambda: len(page.texts("#works tr")) == 20, WAIT, "a full page")
        first = set(page.texts("#works a"))
        page.driver.find_element(By.XPATH, "//button[text()='Next page']").click()
        wait_until(lambda: set(page.texts("#works a")) - first, WAIT, "the next page")
        page.shoot("works")
        assert page.accessibility_violations() == []

        # Cancel a running work from its page.
        gate = tmp_path / "gate"  # never made: it runs until cancelled
        running = client.submit("hold", str(gate))
        wait_until(lambda: running.status().state == work_pb2.IN_PROGRESS, WAIT, "the work to run")
        page.open(f"{base}/works/{running.id}")
        page.wait_text("work-state", lambda t: t == "IN_PROGRESS", "the running work's page")
        wait_until(lambda: page.has("cancel"), WAIT, "the cancel button")
        page.click("cancel")
        page.wait_text("work-state", lambda t: t == "CANCELLED", "the work to end cancelled")
        assert running.status().state == work_pb2.CANCELLED
        wait_until(lambda: page.has("retry"), WAIT, "the retry button")
        page.shoot("work-cancelled")

        # A live tail of results, as they come.
        page.driver.find_element(By.LINK_TEXT, "Results").click()
        wait_until(lambda: page.texts("#results tr"), WAIT, "the tail's first rows")
        fresh = client.submit_many("stamp", [(f"late{i}",) for i in range(5)])
        ids = {h.id for h in fresh}
        wait_until(lambda: ids <= set(page.texts("#results a")), WAIT, "the new results in the tail")
        page.shoot("results")
        assert page.accessibility_violations() == []

        # A narrow screen: nothing wider than it.
        page.driver.set_window_size(390, 844)
        page.open(base + "/")
        page.wait_text("count-DONE", lambda t: t not in ("", "—"), "the overview on a narrow screen")
        assert page.fits_the_width()
        page.shoot("overview-narrow")
        page.open(f"{base}/works/{running.id}")
        page.wait_text("work-state", lambda t: t == "CANCELLED", "the work's page on a narrow screen")
        assert page.fits_the_width()
        page.shoot("work-narrow")


def test_the_overview_stays_live_while_works_flow(board, page):
    cluster, front, base = board
    page.login(base, cluster.tokens["reader"])
    page.wait_text("count-DONE", lambda t: t not in ("", "—"), "the overview's counts")
    stop = threading.Event()

    def produce() -> None:
        with dworkers.Client(front, token=cluster.tokens["admin"], timeout=60) as client:
            while not stop.is_set():
                for handle in client.submit_many("stamp", [("load",)] * 500):
                    handle.accepted(timeout=60)
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        seen = []
        for _ in range(4):  # the count moves again and again while the load flows
            last = number(page.text("count-DONE"))
            page.wait_text("count-DONE", lambda t, last=last: number(t) > last, "the DONE count to move under load")
            seen.append(number(page.text("count-DONE")))
        assert seen == sorted(seen) and seen[-1] > seen[0]
        page.wait_text("throughput-latest", lambda t: t.endswith(")") and not t.startswith("0/s"),
                       "the throughput chart to show the flow")
        page.shoot("overview-under-load")
    finally:
        stop.set()
        producer.join(60)


def test_a_reader_sees_no_cancel_button_and_is_refused_if_it_calls_the_endpoint(board, page, tmp_path):
    cluster, front, base = board
    gate = tmp_path / "gate"
    with dworkers.Client(front, token=cluster.tokens["admin"], timeout=60) as client:
        running = client.submit("hold", str(gate))
        wait_until(lambda: running.status().state == work_pb2.IN_PROGRESS, WAIT, "the work to run")
        page.login(base, cluster.tokens["reader"])
        page.open(f"{base}/works/{running.id}")
        page.wait_text("work-state", lambda t: t == "IN_PROGRESS", "the running work's page")
        assert not page.has("cancel") and not page.has("retry")
        page.shoot("work-as-reader")
        answer = page.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "fetch('/api/works/' + encodeURIComponent(arguments[0]) + '/cancel', {method: 'POST',"
            "  headers: {'X-Dworkers': '1', 'Content-Type': 'application/json'}, body: '{}'})"
            "  .then(r => r.json().then(b => done([r.status, b.error])));", running.id)
        assert answer[0] == 403 and "reader may not call CancelWork" in answer[1]
        assert running.status().state == work_pb2.IN_PROGRESS
        gate.touch()
        assert running.result(timeout=60) == "released"
    page.click("logout")
    wait_until(lambda: page.driver.current_url.startswith(base + "/login"), WAIT, "the login page after logging out")
    page.open(base + "/results")  # the session is gone: back to the login page
    wait_until(lambda: page.driver.current_url.startswith(base + "/login?next=%2Fresults"), WAIT, "a login")
