"""The fetched action list in force: loaded with the terminal, reloaded by the daemon's idle hook
when the held list changes, and kept when a changed file no longer verifies."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from farebox.terminal.link.fetch import FETCHED_FILE
from farebox.terminal.config import TerminalConfig
from farebox.terminal.daemon.background import ActionListReloader
from farebox.terminal.runtime import RuntimeSetupError, open_terminal
from farebox.protocol.settlement import ActionEntry, SignedActionList
from farebox.terminal.link.signedlist import SignedListError, verify

NOW = datetime(2026, 11, 22, 16, 0, tzinfo=timezone.utc)
KEY = Ed25519PrivateKey.generate()
PUBLIC = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def publish(entries, serial, issued, key):
    """The clearing house's signed document of ``entries`` (dicts)."""
    return SignedActionList.publish([ActionEntry(**e) for e in entries], serial, issued,
                                    key).to_json()


def entry(card, reason="lost"):
    return {"card": card, "reason": reason, "at": "2026-11-22T05:00:00+08:00"}


def hold(tmp_path, entries, serial):
    (tmp_path / FETCHED_FILE).write_text(json.dumps(publish(entries, serial, NOW, KEY)))


def test_the_held_list_is_in_force_and_reloaded_when_it_changes(tmp_path, caplog):
    config = TerminalConfig(state_dir=tmp_path, clearing_public_key=PUBLIC)
    hold(tmp_path, [entry("12345678")], 1)
    with open_terminal(config) as terminal:
        assert [e.card_number for e in terminal.action_list] == [12345678]
        reload_list = ActionListReloader(config, terminal)
        reload_list()  # unchanged: nothing to do
        hold(tmp_path, [entry("12345678"), entry("87654321", "cancelled")], 2)
        reload_list()
        assert len(terminal.action_list) == 2
        (tmp_path / FETCHED_FILE).write_text('{"list": "x", "signature": "00"}')
        reload_list()  # a list that does not verify: the last good one stays in force
        assert len(terminal.action_list) == 2
        assert "applying the last good list (serial 2)" in caplog.text


def test_a_held_list_that_does_not_verify_stops_the_terminal_with_one_line(tmp_path):
    other = Ed25519PrivateKey.generate()
    (tmp_path / FETCHED_FILE).write_text(json.dumps(publish([entry("12345678")], 1, NOW, other)))
    config = TerminalConfig(state_dir=tmp_path, clearing_public_key=PUBLIC)
    with pytest.raises(RuntimeSetupError, match="does not verify"):
        with open_terminal(config):
            pass


def test_verify_refuses_older_expired_and_bad_lists():
    document = publish([entry("12345678")], 3, NOW, KEY)
    assert verify(document, PUBLIC, NOW, held_serial=3).serial == 3
    with pytest.raises(SignedListError, match="older"):
        verify(document, PUBLIC, NOW, held_serial=4)
    with pytest.raises(SignedListError, match="expired"):
        verify(document, PUBLIC, NOW + timedelta(days=2))
    bad = publish([{"card": "x", "reason": "lost", "at": "2026-11-22T05:00:00+08:00"}], 1, NOW,
                  KEY)
    with pytest.raises(SignedListError, match="entries"):
        verify(bad, PUBLIC)


@pytest.mark.parametrize("content", ["[" * 100_000, '{"list": 1}', "\xff"])
def test_a_hostile_held_list_is_one_error(tmp_path, content):
    import os

    path = tmp_path / FETCHED_FILE
    if content == "\xff":
        os.mkfifo(path)
    else:
        path.write_text(content)
    config = TerminalConfig(state_dir=tmp_path, clearing_public_key=PUBLIC)
    with pytest.raises(RuntimeSetupError, match="action list"):
        with open_terminal(config):
            pass
