"""The clearing console (issue 20) over plain HTTP against a real ``farebox clearing serve``, on
SQLite and on PostgreSQL: the session cookie's attributes and signature, the CSRF check on
sign-in and on changes, the response headers, every page rendering from the kept summaries
(fleet colours from gaps, open records and forks; the day's writes per hour; a card's history
across terminals; a batch's verification), an entry taken off the list moving the serial, and
the audit. The browser tests (test_console_browser.py) drive the same pages in Chromium."""

from __future__ import annotations

import json
import re
import sqlite3

import httpx
import pytest

from .test_console_browser import ADMIN, ADMIN_PASSWORD, CARD, VIEWER, VIEWER_PASSWORD, House, \
    add_operator
from .test_clearing_http import start_receiver


@pytest.fixture(params=["sqlite", "postgresql"])
def house(request, farebox, tmp_path):
    if request.param == "sqlite":
        db = str(tmp_path / "clearing.sqlite3")
    else:
        db = request.getfixturevalue("pg_url")
    add_operator(db, ADMIN, "admin", ADMIN_PASSWORD)
    add_operator(db, VIEWER, "viewer", VIEWER_PASSWORD)
    with start_receiver(db) as url:
        yield House(farebox, tmp_path, url, db)


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([0-9a-f]{64})"', page).group(1)


def signed_in(url: str, name: str, password: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=60)
    login = client.get("/console/login")
    assert login.status_code == 200
    done = client.post("/console/login", data={"csrf": csrf_of(login.text), "name": name,
                                               "password": password, "next": ""})
    assert done.status_code == 303 and done.headers["location"] == "/console/fleet", done.text
    return client


def fleet_rows(page: str) -> list[tuple[str, str]]:
    """(status, terminal) of the fleet table's rows, in order."""
    return re.findall(r'<tr class="(\w+)">\s*<td>.*?</td>\s*<td><a [^>]*>(T-\d+)</a>', page)


def sql(house, statement, parameters=()):
    """Change the store as a receiver's own later state would be (a gap, a fork, an old
    upload), through the engine's own driver."""
    if house.db.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(house.db, autocommit=True) as conn:
            conn.execute(statement.replace("?", "%s"), parameters)
    else:
        with sqlite3.connect(house.db) as conn:
            conn.execute(statement, parameters)


def test_the_session_cookie_and_the_sign_in_form(house):
    client = httpx.Client(base_url=house.url, timeout=60)
    first = client.get("/console/fleet")
    assert first.status_code == 303
    assert first.headers["location"] == "/console/login?next=%2Fconsole%2Ffleet"
    cookie = first.headers["set-cookie"]
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/console"):
        assert attribute in cookie, cookie
    login = client.get("/console/login")
    assert "default-src 'self'" in login.headers["content-security-policy"]
    assert login.headers["x-frame-options"] == "DENY"
    token = csrf_of(login.text)
    # no token, a wrong token, and no session at all: refused before the password is checked
    for data, cookies in (({"name": ADMIN, "password": ADMIN_PASSWORD}, None),
                          ({"csrf": "0" * 64, "name": ADMIN, "password": ADMIN_PASSWORD}, None),
                          ({"csrf": token, "name": ADMIN, "password": ADMIN_PASSWORD}, {})):
        other = httpx.Client(base_url=house.url, timeout=60, cookies=cookies) \
            if cookies is not None else client
        refused = other.post("/console/login", data=data)
        assert refused.status_code == 403 and "CSRF" in refused.text
        assert other.get("/console/fleet").status_code == 303  # still not signed in
    wrong = client.post("/console/login", data={"csrf": token, "name": ADMIN,
                                                "password": "wrong password"})
    assert wrong.status_code == 401 and "wrong name or password" in wrong.text
    unknown = client.post("/console/login", data={"csrf": token, "name": "mallory",
                                                  "password": "wrong password"})
    assert unknown.status_code == 401
    # a forged cookie (another operator named in a validly shaped payload) is no session
    admin = signed_in(house.url, ADMIN, ADMIN_PASSWORD)
    value = admin.cookies["farebox_console"]
    payload, mac = value.split(".")
    import base64

    forged = base64.urlsafe_b64encode(base64.urlsafe_b64decode(payload + "==").replace(
        b'"alice"', b'"bob"')).decode().rstrip("=")
    for bad in (f"{forged}.{mac}", f"{payload}.{'0' * 64}", "garbage"):
        stranger = httpx.Client(base_url=house.url, timeout=60,
                                cookies={"farebox_console": bad})
        assert stranger.get("/console/fleet").status_code == 303
    assert admin.get("/console/fleet").status_code == 200
    audit = admin.get("/console/audit").text
    assert audit.count("sign-in refused") == 2 and "mallory" in audit


def test_every_page_renders_from_the_kept_summaries(house):
    client = signed_in(house.url, VIEWER, VIEWER_PASSWORD)
    fleet = client.get("/console/fleet")
    assert fleet.status_code == 200 and fleet.text.count('<tr class="green">') == 2
    # each terminal's service provider, and filtering by it
    assert '<td class="provider">Kowloon Bus</td>' in fleet.text
    assert '<td class="provider">—</td>' in fleet.text
    assert fleet_rows(client.get("/console/fleet?q=kowloon").text) == [("green", "T-0001")]
    # a gap: red
    sql(house, "INSERT INTO gaps (source, first_seq, last_seq) SELECT s.id, 7, 9 FROM sources s "
        "JOIN terminals t ON t.id = s.terminal WHERE t.terminal_id = 'T-0001'")
    fleet = client.get("/console/fleet?sort=terminal").text
    assert fleet_rows(fleet) == [("red", "T-0001"), ("green", "T-0002")]
    assert "(3 missing)" in fleet
    assert fleet_rows(client.get("/console/fleet?status=green").text) == [("green", "T-0002")]
    assert fleet_rows(client.get("/console/fleet?q=0001").text) == [("red", "T-0001")]
    assert fleet_rows(client.get("/console/fleet?sort=terminal&desc=1").text) == [
        ("green", "T-0002"), ("red", "T-0001")]
    # records left in doubt: amber; a counter fork of a card a terminal wrote: red
    sql(house, "DELETE FROM gaps")
    sql(house, "UPDATE records SET state = 'in_doubt' WHERE seq = 2 AND source = (SELECT s.id "
        "FROM sources s JOIN terminals t ON t.id = s.terminal WHERE t.terminal_id = 'T-0002')")
    assert fleet_rows(client.get("/console/fleet?sort=terminal").text) == [
        ("green", "T-0001"), ("amber", "T-0002")]
    sql(house, "INSERT INTO forks (card_number, counter, writes, found_utc) SELECT card_number, "
        "counter_before, 2, at_utc FROM card_writes WHERE source = (SELECT s.id FROM sources s "
        "JOIN terminals t ON t.id = s.terminal WHERE t.terminal_id = 'T-0001') AND seq = 1")
    assert fleet_rows(client.get("/console/fleet?sort=status").text) == [
        ("red", "T-0001"), ("amber", "T-0002")]
    # the day: writes per hour (UTC) from card_writes, totals from day_totals
    day = client.get("/console/day?d=2026-11-22").text
    assert '<small id="writes">4 in all</small>' in day
    assert "00:00 UTC: 2" in day and "<svg" in day and "7.00" in day
    # per provider: the Hong Kong business day's settlement statement (T-0001 took 1.00 + 2.50)
    providers = day[day.index('id="providers"'):]
    kowloon = providers[providers.index("Kowloon Bus"):providers.index("</tr>",
                                                                       providers.index("Kowloon"))]
    assert "3.50" in kowloon and "TOTAL" in providers and "(no provider)" in providers
    assert "Hong Kong business day 2026-11-22" in day
    assert client.get("/console/day?d=not-a-day").status_code == 400
    # the card across both terminals, in counter order
    card = client.get(f"/console/card?number={CARD}").text
    assert card.index("T-0001") < card.index("T-0002")
    assert "20.00 → 19.00" in card and "19.00 → 18.00" in card
    assert client.get("/console/card?number=12").status_code == 400
    # a batch's records and its verification
    batches = client.get("/console/batches?terminal=T-0002").text
    link = re.search(r'href="(/console/batches/\d+/1)"', batches).group(1)
    batch = client.get(link).text
    assert batch.count('class="ok"') == 3 and 'class="bad"' not in batch
    assert "it links to the genesis hash" in batch and CARD in batch
    assert client.get("/console/batches/999/1").status_code == 404
    # the viewer sees no change form
    assert 'action="/console/actions/add"' not in client.get("/console/actions").text


def test_an_entry_added_and_taken_off_moves_the_serial_and_is_audited(house):
    admin = signed_in(house.url, ADMIN, ADMIN_PASSWORD)
    token = csrf_of(admin.get("/console/actions").text)
    bad = admin.post("/console/actions/add", data={"csrf": token, "card": CARD,
                                                   "reason": "lost", "note": ""})
    assert bad.status_code == 400 and "say why" in bad.text
    added = admin.post("/console/actions/add", data={"csrf": token, "card": CARD,
                                                     "reason": "aavs_suspended",
                                                     "at": "2026-11-22T09:00",
                                                     "note": "suspended by AAVS"})
    assert added.status_code == 303
    fetched, tapped = house.fetch_and_tap()
    assert fetched["serial"] == 1 and tapped["reason"] == "suspended"
    # a viewer's attempt, with its own valid token, changes nothing
    viewer = signed_in(house.url, VIEWER, VIEWER_PASSWORD)
    refused = viewer.post("/console/actions/remove", data={
        "csrf": csrf_of(viewer.get("/console/actions").text), "card": CARD, "note": "no"})
    assert refused.status_code == 403
    # the admin takes it off: serial 2, and a terminal's next list no longer has it (the card
    # itself stays suspended: the terminal that declined it wrote that on the card)
    off = admin.post("/console/actions/remove", data={"csrf": token, "card": CARD,
                                                      "note": "card found"})
    assert off.status_code == 303
    again = admin.post("/console/actions/remove", data={"csrf": token, "card": CARD,
                                                        "note": "again"})
    assert again.status_code == 400 and "is not on the list" in again.text
    fetched, held = house.fetch("T-0002")
    assert fetched["serial"] == 2 and CARD not in held
    audit = admin.get("/console/audit").text
    assert "AAVS suspension reported 2026-11-22T01:00:00Z; list serial 1" in audit
    assert "list serial 2; note: card found" in audit and "bob" in audit
    # signing out ends the session
    signed_out = admin.post("/console/logout", data={"csrf": token})
    assert signed_out.status_code == 303
    assert admin.get("/console/fleet").status_code == 303


def test_operator_add_refuses_a_short_password_a_taken_name_and_a_bad_role(tmp_path):
    import subprocess

    from .conftest import CONSOLE_SCRIPT

    db = str(tmp_path / "clearing.sqlite3")

    def add(name, role, password):
        return subprocess.run([str(CONSOLE_SCRIPT), "clearing", "operator", "add", "--db", db,
                               "--name", name, "--role", role], input=password + "\n",
                              capture_output=True, text=True, timeout=60)

    short = add("carol", "admin", "too short")
    assert short.returncode == 2 and short.stderr.count("\n") == 1
    assert "at least 10 characters" in short.stderr and "Traceback" not in short.stderr
    assert add("carol", "admin", "long enough pass").returncode == 0
    taken = add("carol", "viewer", "another long one")
    assert taken.returncode == 2 and "exists already" in taken.stderr
    assert add("bad name", "viewer", "long enough pass").returncode == 2
    assert add("dave", "root", "long enough pass").returncode == 2  # click's choice
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT name, role, password_hash FROM operators").fetchall()
        audit = conn.execute("SELECT operator, action, detail FROM audit").fetchall()
    assert [(n, r) for n, r, _ in rows] == [("carol", "admin")]
    assert rows[0][2].startswith("$argon2id$") and "long enough pass" not in rows[0][2]
    assert audit == [("(command line)", "operator added", "carol as admin")]


def test_a_name_with_five_refused_sign_ins_is_locked_out(house):
    client = httpx.Client(base_url=house.url, timeout=60)
    token = csrf_of(client.get("/console/login").text)
    for _ in range(5):
        wrong = client.post("/console/login", data={"csrf": token, "name": VIEWER,
                                                    "password": "guessing wrong"})
        assert wrong.status_code == 401
    locked = client.post("/console/login", data={"csrf": token, "name": VIEWER,
                                                 "password": VIEWER_PASSWORD})
    assert locked.status_code == 429 and "too many refused sign-ins" in locked.text
    assert client.get("/console/fleet").status_code == 303
    signed_in(house.url, ADMIN, ADMIN_PASSWORD)  # another name is not locked
    again = client.post("/console/login", data={"csrf": token, "name": VIEWER,
                                                "password": VIEWER_PASSWORD})
    assert again.status_code == 429  # the lockout's own refusals are audited once, not counted
    audit = signed_in(house.url, ADMIN, ADMIN_PASSWORD).get("/console/audit").text
    assert audit.count("sign-in locked") == 1
    # the lockout is of this name from that address: from another, the operator signs in
    other = httpx.Client(base_url=house.url, timeout=60,
                         transport=httpx.HTTPTransport(local_address="127.0.0.2"))
    login = other.get("/console/login")
    done = other.post("/console/login", data={"csrf": csrf_of(login.text), "name": VIEWER,
                                              "password": VIEWER_PASSWORD, "next": ""})
    assert done.status_code == 303


def test_a_new_password_or_a_removed_account_ends_its_sessions(house):
    """A compromised account is shut out at once: `operator password` ends every session the
    account had (they are bound to its password hash), `operator remove` ends them too; other
    accounts' sessions go on; both are audited; `operator list` never shows a hash."""
    import subprocess

    from .conftest import CONSOLE_SCRIPT

    def operator(*argv, password=None):
        return subprocess.run([str(CONSOLE_SCRIPT), "clearing", "operator", *argv, "--db",
                               house.db, "--json"], input=(password or "") + "\n",
                              capture_output=True, text=True, timeout=60)

    admin, viewer = signed_in(house.url, ADMIN, ADMIN_PASSWORD), signed_in(
        house.url, VIEWER, VIEWER_PASSWORD)
    assert admin.get("/console/fleet").status_code == 200
    changed = operator("password", "--name", ADMIN, password="a brand new passphrase")
    assert changed.returncode == 0 and "a brand new passphrase" not in changed.stdout
    gone = admin.get("/console/fleet")
    assert gone.status_code == 303 and gone.headers["location"].startswith("/console/login")
    assert viewer.get("/console/fleet").status_code == 200
    again = signed_in(house.url, ADMIN, "a brand new passphrase")
    assert again.get("/console/actions").status_code == 200

    assert operator("remove", "--name", VIEWER).returncode == 0
    assert viewer.get("/console/fleet").status_code == 303
    refused = operator("remove", "--name", VIEWER)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    listed = operator("list")
    assert [o["operator"] for o in json.loads(listed.stdout)["operators"]] == [ADMIN]
    assert "argon2" not in listed.stdout
    audit = again.get("/console/audit").text
    assert "password changed" in audit and "operator removed" in audit


def test_a_day_outside_the_scheme_is_a_clear_refusal(house):
    client = signed_in(house.url, VIEWER, VIEWER_PASSWORD)
    for day in ("9999-12-31", "0001-01-01"):
        page = client.get("/console/day", params={"d": day})
        assert page.status_code == 400 and "1990 to 2199" in page.text


def test_a_rehash_never_overwrites_a_password_set_meanwhile(tmp_path):
    """A sign-in that rehashes the password it checked (Argon2's parameters raised) writes the
    new hash only if the account still has the one it checked: a password changed meanwhile
    wins, and that sign-in gets no session."""
    from farebox.clearing.console.auth import add_operator as add, change_password
    from farebox.clearing.console.data import ConsoleData
    from farebox.clearing.store import Store

    with Store(str(tmp_path / "c.sqlite3")) as store:
        data = ConsoleData(store)
        add(data, "carol", "admin", "the first passphrase", "2026-11-22T00:00:00Z")
        checked = data.operator("carol").password_hash
        change_password(data, "carol", "the second passphrase", "2026-11-22T00:01:00Z")
        current = data.operator("carol").password_hash
        assert not data.set_password_hash("carol", "rehash-of-the-first", checked)
        assert data.operator("carol").password_hash == current
        assert data.set_password_hash("carol", current, current)


def test_signing_out_ends_every_session_of_the_account_a_copied_cookie_too(house):
    client = signed_in(house.url, ADMIN, ADMIN_PASSWORD)
    copied = httpx.Client(base_url=house.url, timeout=60, cookies=dict(client.cookies))
    assert copied.get("/console/fleet").status_code == 200
    page = client.get("/console/fleet").text
    out = client.post("/console/logout", data={"csrf": csrf_of(page)})
    assert out.status_code == 303
    assert copied.get("/console/fleet").status_code == 303  # to the sign-in page
    assert "signed out" in signed_in(house.url, ADMIN, ADMIN_PASSWORD).get(
        "/console/audit").text


def test_every_console_response_has_the_security_headers_and_a_huge_form_is_refused(house):
    client = httpx.Client(base_url=house.url, timeout=60)
    for path in ("/console/fleet", "/console/static/console.css", "/console/nowhere",
                 "/console/"):
        response = client.get(path)
        assert response.headers.get("x-frame-options") == "DENY", path
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"], path
    token = csrf_of(client.get("/console/login").text)
    fields = {"csrf": token, "name": ADMIN, "password": "x",
              **{f"f{n}": "1" for n in range(40)}}
    refused = client.post("/console/login", data=fields)
    assert refused.status_code == 403 and "Traceback" not in refused.text


def test_password_checks_beyond_the_bound_are_told_to_wait(tmp_path, monkeypatch):
    """At most PASSWORD_CHECKS Argon2id checks run at once (64 MiB each): one more is a 503
    with Retry-After, no check made. Here the bound is 0, so the first is already one more."""
    import asyncio

    from farebox.clearing.app import create_app
    from farebox.clearing.console import app as console_app
    from farebox.clearing.console.auth import add_operator as add
    from farebox.clearing.console.data import ConsoleData
    from farebox.clearing.service import Receiver
    from farebox.clearing.store import Store

    monkeypatch.setattr(console_app, "PASSWORD_CHECKS", 0)

    async def sign_in(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            token = csrf_of((await client.get("/console/login")).text)
            return await client.post("/console/login", data={
                "csrf": token, "name": "carol", "password": "the first passphrase"})

    with Store(str(tmp_path / "c.sqlite3")) as store:
        add(ConsoleData(store), "carol", "admin", "the first passphrase", "2026-11-22T00:00:00Z")
        busy = asyncio.run(sign_in(create_app(Receiver(store))))
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert "busy" in busy.text
