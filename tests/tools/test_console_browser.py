"""The clearing console (issue 20) in a real browser: Debian's headless ``chromium`` driven by
Selenium through ``chromedriver``, against a real ``farebox clearing serve`` that two simulated
terminals uploaded their signed batches to.

An admin signs in, finds a card, reports it lost, sees it on the list; a terminal that fetches
the next list (``farebox actions fetch``) declines the card. A wrong password, a form without its
CSRF token and a viewer changing the list are refused and change nothing. Screenshots of the
fleet and day views are written to ``<tmp>/screenshots/`` (the README's is one of them).

These tests never skip: bootstrap.sh installs chromium and chromium-driver.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from .conftest import CONSOLE_SCRIPT
from .test_clearing_http import AT, LATER, start_receiver, trusting

CARD = "12345678"
REPORTED = "2026-11-22T09:00"  # Hong Kong time, as the form takes it
AFTER = "2026-11-22T13:00:00+08:00"  # past the report + 3 h: a lost card is refused
ADMIN, ADMIN_PASSWORD = "alice", "correct horse battery"
VIEWER, VIEWER_PASSWORD = "bob", "staple of the viewers"


def add_operator(db, name, role, password):
    done = subprocess.run([str(CONSOLE_SCRIPT), "clearing", "operator", "add", "--db", str(db),
                           "--name", name, "--role", role, "--json"], input=password + "\n",
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert password not in done.stdout + done.stderr
    return json.loads(done.stdout)


#: the service provider T-0001 is enrolled under (T-0002 has none)
PROVIDER = "Kowloon Bus"


class House:
    """Two terminals that tapped one card (and one other each), uploaded to a real receiver."""

    def __init__(self, farebox, tmp_path, url, db):
        self.farebox, self.url, self.db = farebox, url, str(db)
        self.card = farebox.card(number=CARD, balance="20.00")
        other = farebox.card("other.json", number="87654321", balance="20.00")
        self.configs = {}
        farebox("clearing", "provider", "add", "--db", db, PROVIDER, "--json").json()
        for name, minutes in (("T-0001", 0), ("T-0002", 30)):
            state = tmp_path / name
            made = farebox("terminal", "init", "--state", state, "--id", name, "--json").json()
            under = ["--provider", PROVIDER] if name == "T-0001" else []  # T-0002: none
            farebox("clearing", "enroll", "--db", db, "--terminal", name, "--pubkey",
                    made["public_key"], *under, "--json").json()
            at = AT.replace("08:00", f"08:{minutes:02d}")
            farebox.tap(self.card, "--fare", "1.00", at=at, state=state).json()
            farebox.tap(other, "--fare", "2.50", at=LATER.replace("08:10", f"{9 + minutes // 30:02d}:10"),
                        state=state).json()
            farebox("batch", "close", "--state", state, "--json").json()
            config = trusting(farebox, self.db, url, f"{name}.toml")
            sent = farebox("upload", "--state", state, "--config", config, "--json").json()
            assert sent["pending"] == 0, sent
            self.configs[name] = (state, config)

    def fetch(self, terminal="T-0001"):
        """``farebox actions fetch`` at that terminal; (its answer, the list it holds now)."""
        state, config = self.configs[terminal]
        fetched = self.farebox("actions", "fetch", "--state", state, "--config", config,
                               "--json").json()
        return fetched, (state / "actions.json").read_text()

    def fetch_and_tap(self, terminal="T-0001"):
        state, _ = self.configs[terminal]
        fetched, _ = self.fetch(terminal)
        tapped = self.farebox("tap", self.card, "--fare", "1.00", "--at", AFTER, "--state",
                              state, "--json").json()
        return fetched, tapped


@pytest.fixture
def house(farebox, tmp_path):
    db = tmp_path / "clearing.sqlite3"
    add_operator(db, ADMIN, "admin", ADMIN_PASSWORD)
    add_operator(db, VIEWER, "viewer", VIEWER_PASSWORD)
    with start_receiver(db) as url:
        yield House(farebox, tmp_path, url, db)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    assert chromium and driver_path, "bootstrap.sh installs chromium and chromium-driver"
    options = Options()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,900", "--no-first-run",
                     "--disable-extensions", "--disable-background-networking"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def by_id(driver, name):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, name)


def submitting(driver, action):
    """Run ``action`` (a click that submits a form), then wait until the browser shows the next
    page (a click returns before the navigation it starts has ended): the old page's window
    carries a mark the next page's does not."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.execute_script("window.__farebox_old_page = true")
    action()
    # a script sent while the old page is torn down may fail: asked again
    WebDriverWait(driver, 60, ignored_exceptions=(WebDriverException,)).until(lambda d: d.execute_script(
        "return window.__farebox_old_page === undefined && document.readyState === 'complete'"))


def sign_in(driver, url, name, password, page="fleet"):
    driver.get(f"{url}/console/{page}")
    assert "/console/login" in driver.current_url  # every page needs a signed-in operator
    by_id(driver, "name").send_keys(name)
    by_id(driver, "password").send_keys(password)
    submitting(driver, by_id(driver, "sign-in").click)


def text_of(driver, name):
    return by_id(driver, name).text


def test_an_admin_reports_a_card_lost_and_the_terminal_declines_it(house, browser, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    # a wrong password is refused, and nobody is signed in
    sign_in(browser, house.url, ADMIN, "not the password")
    assert text_of(browser, "error") == "wrong name or password"
    assert "/console/login" in browser.current_url
    # the admin, sent to sign in from the list's page and back there
    sign_in(browser, house.url, ADMIN, ADMIN_PASSWORD, page="actions")
    assert browser.current_url.endswith("/console/actions")  # back where it was sent from
    assert text_of(browser, "operator") == "alice (admin)"
    browser.get(f"{house.url}/console/fleet")
    fleet = text_of(browser, "fleet")
    assert "T-0001" in fleet and "T-0002" in fleet
    browser.save_screenshot(str(shots / "fleet.png"))
    browser.get(f"{house.url}/console/day?d=2026-11-22")
    assert text_of(browser, "writes") == "4 in all"  # two taps at each terminal
    assert "payment" in text_of(browser, "totals") and "7.00" in text_of(browser, "totals")
    browser.save_screenshot(str(shots / "day.png"))
    # find the card: its history at both terminals
    browser.get(f"{house.url}/console/card")
    by_id(browser, "number").send_keys(CARD)
    submitting(browser, by_id(browser, "find").click)
    history = text_of(browser, "history")
    assert "T-0001" in history and "T-0002" in history and "20.00 → 19.00" in history
    assert "Not on the action list" in text_of(browser, "listed")
    browser.save_screenshot(str(shots / "card.png"))
    # report it lost
    from selenium.webdriver.support.ui import Select

    Select(by_id(browser, "reason")).select_by_value("lost")
    browser.execute_script("arguments[0].value = arguments[1]", by_id(browser, "at"), REPORTED)
    by_id(browser, "note").send_keys("reported by phone, caller verified")
    submitting(browser, by_id(browser, "report").click)
    assert text_of(browser, "done") == f"listed {CARD} serial 1"
    assert text_of(browser, "serial") == "serial 1"
    entries = text_of(browser, "entries")
    assert CARD in entries and "loss report" in entries and "2026-11-22T01:00:00Z" in entries
    # the terminal fetches the next list and declines the card
    fetched, tapped = house.fetch_and_tap()
    assert fetched["serial"] == 1
    assert (tapped["outcome"], tapped["reason"]) == ("declined", "blocked")
    # the audit says who did it and why
    browser.get(f"{house.url}/console/audit")
    audit = text_of(browser, "audit")
    assert "alice listed 12345678" in audit and "caller verified" in audit
    assert "sign-in refused" in audit
    for name in ("fleet.png", "day.png"):
        png = (shots / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_a_form_without_its_csrf_token_changes_nothing(house, browser):
    sign_in(browser, house.url, ADMIN, ADMIN_PASSWORD)
    browser.get(f"{house.url}/console/actions")
    form = by_id(browser, "add-form")
    browser.execute_script("arguments[0].querySelector('input[name=csrf]').remove()", form)
    form.find_element("name", "card").send_keys(CARD)
    form.find_element("name", "note").send_keys("no token")
    submitting(browser, form.find_element("css selector", "button").click)
    assert "CSRF token is missing or wrong" in text_of(browser, "error")
    browser.get(f"{house.url}/console/actions")
    assert text_of(browser, "serial") == "serial 0" and CARD not in text_of(browser, "entries")
    # a token from another session is as good as none
    browser.get(f"{house.url}/console/actions")
    form = by_id(browser, "add-form")
    browser.execute_script("arguments[0].querySelector('input[name=csrf]').value = "
                           "'0'.repeat(64)", form)
    form.find_element("name", "card").send_keys(CARD)
    form.find_element("name", "note").send_keys("forged token")
    submitting(browser, form.find_element("css selector", "button").click)
    assert "CSRF token is missing or wrong" in text_of(browser, "error")
    fetched, tapped = house.fetch_and_tap()
    assert fetched["serial"] == 0 and tapped["outcome"] == "approved"


def test_a_viewer_reads_the_list_and_cannot_change_it(house, browser):
    sign_in(browser, house.url, VIEWER, VIEWER_PASSWORD)
    assert text_of(browser, "operator") == "bob (viewer)"
    browser.get(f"{house.url}/console/actions")
    assert not browser.find_elements("id", "add-form")  # no form to change it
    # a change posted anyway, with the viewer's own valid token
    submitting(browser, lambda: browser.execute_script(
        "var f = document.createElement('form'); f.method = 'post';"
        "f.action = '/console/actions/add';"
        "var fields = {csrf: document.querySelector('input[name=csrf]').value,"
        " card: arguments[0], reason: 'lost', note: 'a viewer tries'};"
        "for (var k in fields) { var i = document.createElement('input'); i.type = 'hidden';"
        " i.name = k; i.value = fields[k]; f.appendChild(i); }"
        "document.body.appendChild(f); f.submit();", CARD))
    assert "only an admin changes the action list" in text_of(browser, "error")
    browser.get(f"{house.url}/console/actions")
    assert text_of(browser, "serial") == "serial 0"
    browser.get(f"{house.url}/console/audit")
    assert "bob change refused" in text_of(browser, "audit")
    fetched, tapped = house.fetch_and_tap()
    assert fetched["serial"] == 0 and tapped["outcome"] == "approved"
