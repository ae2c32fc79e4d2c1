"""The terminal's configuration: one frozen object, read once.

Sources, later ones winning: a TOML file (``--config`` or ``FAREBOX_CONFIG``), the environment
(``FAREBOX_STATE``), then command-line flags. Every error names the key it is about.

The built-in defaults (no file) are the demo set-up: the published test keys, allowed. A file is
a deployment: its keys are the test keys only if it says ``allow_test_keys = true`` (left out:
false), so a file that names no keys, or ``keys = "test"`` alone, is refused where money moves::

    [terminal]
    id = "BUS-0042"                 # the journal's own random id if left out
    state = "/var/lib/farebox"      # journal, counters seen, keys, batches
    reader = "usb:054c:06c3"        # sim:CARD.json | udp:HOST:PORT | usb[:VID:PID] | tty:... | pcsc[:NAME]
    pcsc_mode = "auto"              # PC/SC frames: "auto" (by reader name/ATR), "acr122u", "part3"
    keys = "file:/etc/farebox/keys.toml"  # or "pkcs11:module=LIB;token=LABEL;pin-file=PATH"
    allow_test_keys = false         # true: keys = "test" (the published test keys) may be used
    action_list = "/etc/farebox/hotlist.json"
    action_list_max_skew_s = 300    # a fetched list issued further past this clock is refused
    action_list_max_serial_jump = 100000  # and one whose serial jumps further past the held one
    minimum_add_value = "50.00"
    retap_window_s = 60
    max_clock_ahead_s = 604800      # a tap time further past the terminal's trusted time is flagged
    batch_max_records = 1000        # settlement: close a batch at this many records,
    batch_max_age_s = 900           # when the oldest is this old, and at Hong Kong midnight
    batch_retention_days = 90       # acknowledged batches' bodies are dropped after this
    clearing_url = "https://clearing.example"  # the daemon uploads batches there (none: it does not)
    upload_interval_s = 60          # and tries at least this often
    clearing_public_key = "64 hex digits"  # verifies the action lists and acks it gets there
    clearing_ca_bundle = "/etc/farebox/clearing-ca.pem"  # https:// trusts these CAs only
    clearing_insecure_http = false  # allow plain http:// to a clearing house not on loopback
    log_format = "text"             # the daemon's log: "text" (stderr) or "json" (stdout, journald)
    metrics_listen = "127.0.0.1:9108"  # a Prometheus endpoint, loopback (left out: none)
    metrics_allow_remote = false    # true: metrics_listen may be an address beyond this host

    [fares]                         # adult required; a class left out pays the adult fare
    adult = "5.80"
    child = "2.90"
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from farebox.cardimage.money import parse_amount
from farebox.protocol.files import UntrustedFileError, read_limited

from farebox.terminal.core.rules import DEFAULT_MINIMUM_ADD_VALUE_CENTS, FareClass, Tariff
from farebox.terminal.errors import BadInput
from farebox.terminal.store.identity import TERMINAL_ID_PATTERN
from farebox.terminal.store.settlement import (
    DEFAULT_MAX_AGE_S, DEFAULT_MAX_ITEMS, DEFAULT_RETENTION,
)
from farebox.terminal.card.tap import DEFAULT_MAX_CLOCK_AHEAD_S, DEFAULT_RETAP_WINDOW_S
from farebox.terminal.link.signedlist import DEFAULT_MAX_SERIAL_JUMP, DEFAULT_MAX_SKEW_S, ListBounds
from farebox.terminal.card.keys import parse_key_source

#: the configuration file's own name of a setting, where it differs from the field's (what
#: ``doctor`` says: an operator edits the file, not this module)
FILE_KEYS = {"terminal_id": "id", "state_dir": "state",
             "minimum_add_value_cents": "minimum_add_value", "tariff": "[fares]"}

ENV_CONFIG = "FAREBOX_CONFIG"
ENV_STATE = "FAREBOX_STATE"
_TERMINAL_ID = TERMINAL_ID_PATTERN
_MAX_RETAP_WINDOW_S = 24 * 3600
_CLOCK_AHEAD_RANGE_S = (60, 366 * 24 * 3600)


class ConfigError(BadInput, ValueError):
    """The configuration cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class TerminalConfig:
    state_dir: Path | None = None  # None: the caller's default (the user's data directory)
    terminal_id: str | None = None
    reader: str | None = None
    pcsc_mode: str = "auto"
    # ---- card keys (issue 17 item 6): the source, and whether the published test keys may be
    # used; True only for the built-in defaults: a configuration file says so or it is False
    keys: str = "test"
    allow_test_keys: bool = True
    action_list: Path | None = None
    action_list_max_skew_s: float = DEFAULT_MAX_SKEW_S
    action_list_max_serial_jump: int = DEFAULT_MAX_SERIAL_JUMP
    tariff: Tariff | None = None
    minimum_add_value_cents: int = DEFAULT_MINIMUM_ADD_VALUE_CENTS
    retap_window_s: float = DEFAULT_RETAP_WINDOW_S
    max_clock_ahead_s: float = DEFAULT_MAX_CLOCK_AHEAD_S
    batch_max_records: int = DEFAULT_MAX_ITEMS
    batch_max_age_s: float = DEFAULT_MAX_AGE_S
    batch_retention_days: int = DEFAULT_RETENTION.days
    clearing_url: str | None = None
    upload_interval_s: float = 60.0
    clearing_public_key: bytes | None = None
    # issue 17 item 3: how the clearing house is reached (uploads need clearing_public_key)
    clearing_ca_bundle: Path | None = None
    clearing_insecure_http: bool = False
    log_format: str = "text"
    metrics_listen: str | None = None
    #: issue 21: a metrics_listen beyond loopback only when the configuration says so (the
    #: endpoint has no authentication)
    metrics_allow_remote: bool = False
    #: where each setting came from ("default", "file", "env", "flag"), for `doctor` and notices
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def with_flags(self, **flags) -> TerminalConfig:
        """Apply the flags that were given (None means not given)."""
        given = {name: value for name, value in flags.items() if value is not None}
        unknown = set(given) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"no such setting: {sorted(unknown)}")
        if "terminal_id" in given:
            _check_terminal_id(given["terminal_id"], "--terminal-id")
        sources = {**self.sources, **{name: "flag" for name in given}}
        return replace(self, **given, sources=sources)

    @property
    def list_bounds(self) -> ListBounds:
        """What a fetched action list must keep to beyond its signature."""
        return ListBounds(self.action_list_max_skew_s, self.action_list_max_serial_jump)


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> TerminalConfig:
    """The configuration from ``path`` (else ``$FAREBOX_CONFIG``, else none) and the environment."""
    env = os.environ if env is None else env
    if path is None and env.get(ENV_CONFIG):
        path = Path(env[ENV_CONFIG])
    settings: dict = {}
    sources: dict[str, str] = {}
    if path is not None:
        settings = _from_toml(Path(path))
        sources = {name: "file" for name in settings}
        settings.setdefault("allow_test_keys", False)  # a file allows the test keys only if it says
    if env.get(ENV_STATE):
        settings["state_dir"] = Path(env[ENV_STATE])
        sources["state_dir"] = "env"
    return TerminalConfig(**settings, sources=sources)


def _from_toml(path: Path) -> dict:
    try:
        text = read_limited(path).decode("utf-8")
    except UntrustedFileError as error:
        raise ConfigError(str(error)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not TOML (not UTF-8 text)") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not TOML ({error})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not usable TOML (nested too deeply)") from None
    unknown = set(document) - {"terminal", "fares"}
    if unknown:
        raise ConfigError(f"{path}: unknown section or key {sorted(unknown)[0]!r}")
    settings: dict = {}
    terminal = _table(document, "terminal", path)
    readers = {
        "id": ("terminal_id", _terminal_id),
        "state": ("state_dir", lambda v, k: Path(_string(v, k))),
        "reader": ("reader", _string),
        "pcsc_mode": ("pcsc_mode", _pcsc_mode),
        "keys": ("keys", _keys),
        "allow_test_keys": ("allow_test_keys", _allow_test_keys),
        "action_list": ("action_list", lambda v, k: Path(_string(v, k))),
        "action_list_max_skew_s": ("action_list_max_skew_s", _list_skew),
        "action_list_max_serial_jump": ("action_list_max_serial_jump", _serial_jump),
        "minimum_add_value": ("minimum_add_value_cents", _amount),
        "retap_window_s": ("retap_window_s", _window),
        "max_clock_ahead_s": ("max_clock_ahead_s", _clock_ahead),
        "batch_max_records": ("batch_max_records", _batch_records),
        "batch_max_age_s": ("batch_max_age_s", _batch_age),
        "batch_retention_days": ("batch_retention_days", _retention_days),
        "clearing_url": ("clearing_url", _url),
        "upload_interval_s": ("upload_interval_s", _batch_age),
        "clearing_public_key": ("clearing_public_key", _public_key),
        "clearing_ca_bundle": ("clearing_ca_bundle", lambda v, k: Path(_string(v, k))),
        "clearing_insecure_http": ("clearing_insecure_http", _flag),
        "log_format": ("log_format", _log_format),
        "metrics_listen": ("metrics_listen", _metrics_listen),
        "metrics_allow_remote": ("metrics_allow_remote", _flag),
    }
    for key, value in terminal.items():
        if key not in readers:
            raise ConfigError(f"{path}: terminal.{key}: unknown key")
        name, read = readers[key]
        try:
            settings[name] = read(value, key)
        except ValueError as error:
            raise ConfigError(f"{path}: terminal.{key}: {error}") from None
    if "metrics_listen" in settings:  # read whichever of the two keys came first
        try:
            parse_listen(settings["metrics_listen"],
                         allow_remote=settings.get("metrics_allow_remote", False))
        except MetricsError as error:
            raise ConfigError(f"{path}: terminal.metrics_listen: {error}") from None
    fares = _table(document, "fares", path)
    if fares:
        settings["tariff"] = _tariff(fares, path)
    return settings


def _table(document: dict, name: str, path: Path) -> dict:
    table = document.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {name}: expected a table [{name}]")
    return table


def _string(value: object, key: str) -> str:
    """A non-empty string without NUL characters: every path-valued key (state, action_list,
    keys' file:PATH, reader's sim:PATH / tty:PATH) and every other text key is read by this one
    check, so a NUL never reaches the operating system (which refuses it as an internal error)."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    if "\x00" in value:
        raise ValueError("contains a NUL character (\\u0000); a path cannot hold one")
    return value


def _terminal_id(value: object, key: str) -> str:
    return _check_terminal_id(_string(value, key), key)


def _check_terminal_id(value: str, key: str) -> str:
    if not _TERMINAL_ID.fullmatch(value):
        raise ValueError(f"terminal id must be 1-32 letters, digits, '.', '_' or '-': {value!r}")
    return value


PCSC_MODES = ("auto", "acr122u", "part3")


def _pcsc_mode(value: object, key: str) -> str:
    text = _string(value, key)
    if text not in PCSC_MODES:
        raise ValueError(f"expected one of {', '.join(PCSC_MODES)}, got {text!r}")
    return text


LOG_FORMATS = ("text", "json")


def _log_format(value: object, key: str) -> str:
    text = _string(value, key)
    if text not in LOG_FORMATS:
        raise ValueError(f"expected one of {', '.join(LOG_FORMATS)}, got {text!r}")
    return text


class MetricsError(BadInput, ValueError):
    """A listen address that cannot be used (one line)."""


def parse_listen(value: str, *, allow_remote: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6); port 0 picks a free one. HOST is a loopback
    address unless ``allow_remote`` (config ``metrics_allow_remote = true``): then any IP
    address of this host, or ``0.0.0.0`` / ``::`` for all of them."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise MetricsError(f"expected HOST:PORT, got {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and address.is_loopback:
        return host, int(port)
    if not allow_remote:
        raise MetricsError(f"{value!r} is not a loopback address (127.0.0.1 or ::1): the "
                           "endpoint has no authentication (metrics_allow_remote = true in the "
                           "configuration serves it beyond this host)")
    if address is None:
        raise MetricsError(f"{value!r}: expected an IP address (0.0.0.0 or :: for every "
                           "address of this host), not a name")
    return host, int(port)


def is_loopback_listen(value: str) -> bool:
    """Whether a ``metrics_listen`` that parses stays on this host."""
    try:
        parse_listen(value)
    except MetricsError:
        return False
    return True


def _metrics_listen(value: object, key: str) -> str:
    text = _string(value, key)
    parse_listen(text, allow_remote=True)  # the syntax; loopback is checked with the whole table
    return text


def _keys(value: object, key: str) -> str:
    """A key source: "test", "file:PATH" or "pkcs11:module=LIB;token=LABEL;pin-file=PATH[;...]"
    (the syntax is checked here; the file or token is opened where the keys are used)."""
    text = _string(value, key)
    parse_key_source(text)  # ValueError saying what is wrong
    return text


def _allow_test_keys(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _amount(value: object, key: str) -> int:
    if not isinstance(value, str):
        raise ValueError('amounts are strings with at most two decimal places, e.g. "5.80"')
    return parse_amount(value)


def _window(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 <= value <= _MAX_RETAP_WINDOW_S:
        raise ValueError(f"expected a number of seconds from 0 to {_MAX_RETAP_WINDOW_S}")
    return float(value)


def _clock_ahead(value: object, key: str) -> float:
    low, high = _CLOCK_AHEAD_RANGE_S
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"expected a number of seconds from {low} to {high}")
    return float(value)


_LIST_SKEW_RANGE_S = (0, 24 * 3600)
_SERIAL_JUMP_RANGE = (1, 2 ** 53)


def _list_skew(value: object, key: str) -> float:
    low, high = _LIST_SKEW_RANGE_S
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"expected a number of seconds from {low} to {high}")
    return float(value)


def _serial_jump(value: object, key: str) -> int:
    low, high = _SERIAL_JUMP_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"expected a whole number from {low} to {high}")
    return value


def _retention_days(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 3650:
        raise ValueError("expected a whole number of days from 1 to 3650")
    return value


def _public_key(value: object, key: str) -> bytes:
    text = _string(value, key)
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise ValueError("expected 64 hex digits (an Ed25519 public key)")
    return bytes.fromhex(text)


def _flag(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _url(value: object, key: str) -> str:
    text = _string(value, key)
    if not text.startswith(("http://", "https://")) or len(text) > 2000:
        raise ValueError(f"expected http://... or https://..., got {text[:80]!r}")
    return text


def _batch_records(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100_000:
        raise ValueError("expected a whole number of records from 1 to 100000")
    return value


def _batch_age(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 1 <= value <= _MAX_RETAP_WINDOW_S:
        raise ValueError(f"expected a number of seconds from 1 to {_MAX_RETAP_WINDOW_S}")
    return float(value)


def _tariff(table: dict, path: Path) -> Tariff:
    fares: dict[FareClass, int] = {}
    for key, value in table.items():
        try:
            fare_class = FareClass(key)
        except ValueError:
            raise ConfigError(f"{path}: fares.{key}: unknown fare class (one of "
                              f"{', '.join(c.value for c in FareClass)})") from None
        try:
            cents = _amount(value, key)
        except ValueError as error:
            raise ConfigError(f"{path}: fares.{key}: {error}") from None
        if cents <= 0:
            raise ConfigError(f"{path}: fares.{key}: a fare must be more than zero")
        fares[fare_class] = cents
    if FareClass.ADULT not in fares:
        raise ConfigError(f"{path}: fares.adult: an adult fare is required")
    return Tariff(fares)
