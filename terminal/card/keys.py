"""The terminal's key stores: where the scheme master keys are and how a card's key comes of them.

Cards carry a key version; the store maps it to a scheme master key and diversifies the card's own
key by IDm (``cardimage/mac.py``: one AES-CMAC over 32 bytes). Three sources, named by the
configuration's ``keys``::

    test                  the published TEST keys (this file): demos and tests only
    file:PATH             master keys in a TOML file, mode 0600 (refused when others may read it)
    pkcs11:module=LIB;token=LABEL;pin-file=PATH[;label=PREFIX][;issue-version=N]
                          master keys inside a PKCS#11 token (an HSM, a smart card, SoftHSM2):
                          the AES key labelled PREFIX-N is version N (PREFIX: farebox-master),
                          the diversification CMAC runs in the token (CKM_AES_CMAC) and the
                          master key never leaves it

Keys never appear in reprs, logs, messages or output.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import tomllib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from farebox.cardimage.mac import KEY_SIZE, diversification_message, diversify_key
from farebox.protocol.frames import SYSTEM_CODE_LITE_S
from farebox.protocol.files import UntrustedFileError, open_regular, read_fd_limited
from farebox.terminal.errors import BadInput

#: TEST KEY. Published in this source file, so it protects nothing: for demos, simulated cards and
#: the test suite only. Cards made with it carry key version 0xF0, which `card show` labels TEST.
TEST_KEY_VERSION = 0xF0
_TEST_MASTER_KEY = b"TEST KEY-NOT SEC"  # 16 bytes, deliberately readable

#: the label of a token's master key for version N is "<label>-N"
DEFAULT_PKCS11_LABEL = "farebox-master"
#: how many diversified card keys a token-backed store keeps (each saves one token call)
DERIVED_KEY_CACHE = 1024
_MAX_SECRET_FILE = 64 * 1024


class KeyFileError(BadInput, ValueError):
    """A key source (key file, PIN file, PKCS#11 module or token) that cannot be used. Messages
    never contain key material or a PIN."""


class KeyStore(Protocol):
    """What a tap, an issue and an examination need of a key store."""

    issue_version: int

    def card_key(self, version: int, idm: bytes) -> bytes:
        """The card's diversified key; KeyError if this store has no such version."""

    def is_test_version(self, version: int) -> bool: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SoftwareKeyStore:
    master_keys: dict[int, bytes] = field(repr=False)
    issue_version: int
    #: the latest :data:`DERIVED_KEY_CACHE` card keys derived (a card tapped again, a daemon's
    #: regulars), in memory only, never written or logged
    _derived: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False,
                                  compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False,
                                  compare=False)

    def __post_init__(self) -> None:
        for version, key in self.master_keys.items():
            if not 0 <= version <= 0xFF or len(key) != KEY_SIZE:
                raise ValueError(f"key version {version}: need a version 0-255 and a 16-byte key")
        if self.issue_version not in self.master_keys:
            raise ValueError(f"no key for the issue key version {self.issue_version}")

    def card_key(self, version: int, idm: bytes) -> bytes:
        """The card's diversified key; KeyError if this store has no such version."""
        at = (version, bytes(idm))
        with self._lock:
            key = self._derived.get(at)
            if key is not None:
                self._derived.move_to_end(at)
                return key
        key = diversify_key(self.master_keys[version], idm, SYSTEM_CODE_LITE_S)
        with self._lock:
            self._derived[at] = key
            if len(self._derived) > DERIVED_KEY_CACHE:
                self._derived.popitem(last=False)
        return key

    def is_test_version(self, version: int) -> bool:
        return version == TEST_KEY_VERSION

    @property
    def versions(self) -> list[int]:
        return sorted(self.master_keys)

    def close(self) -> None:
        """Nothing to release (the token-backed store closes its session)."""

    def __repr__(self) -> str:
        return (f"SoftwareKeyStore(versions={sorted(self.master_keys)}, "
                f"issue_version={self.issue_version})")


# ---- key sources (the configuration's `keys`) ------------------------------------------------

@dataclass(frozen=True)
class PublishedKeySource:
    """``keys = "test"``: the published test keys."""

    def __str__(self) -> str:
        return "test"


@dataclass(frozen=True)
class KeyFileSource:
    """``keys = "file:PATH"``."""
    path: Path

    def __str__(self) -> str:
        return f"file:{self.path}"


@dataclass(frozen=True)
class Pkcs11Source:
    """``keys = "pkcs11:module=LIB;token=LABEL;pin-file=PATH[;label=PREFIX][;issue-version=N]"``."""
    module: Path
    token: str
    pin_file: Path
    label: str = DEFAULT_PKCS11_LABEL
    issue_version: int | None = None  # None: the highest version the token holds

    def __str__(self) -> str:
        return f"pkcs11 token {self.token!r} ({self.module})"


KeySource = PublishedKeySource | KeyFileSource | Pkcs11Source
_PKCS11_PARAMETERS = ("module", "token", "pin-file", "label", "issue-version")
_LABEL = re.compile(r"[A-Za-z0-9._-]{1,64}")


def parse_key_source(text: str) -> KeySource:
    """The key source a ``keys`` value names; ValueError saying what is wrong (one line)."""
    if text == "test":
        return PublishedKeySource()
    if text.startswith("file:"):
        if not text.removeprefix("file:"):
            raise ValueError('file: needs a path ("file:/etc/farebox/keys.toml")')
        return KeyFileSource(Path(text.removeprefix("file:")))
    if text.startswith("pkcs11:"):
        return _parse_pkcs11(text.removeprefix("pkcs11:"))
    raise ValueError(f'expected "test", "file:PATH" or "pkcs11:module=LIB;token=LABEL;'
                     f'pin-file=PATH", got {text[:80]!r}')


def _parse_pkcs11(text: str) -> Pkcs11Source:
    given: dict[str, str] = {}
    for part in text.split(";"):
        name, equals, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not part.strip():
            continue
        if not equals or not value:
            raise ValueError(f"pkcs11: {part.strip()!r}: expected NAME=VALUE")
        if name not in _PKCS11_PARAMETERS:
            raise ValueError(f"pkcs11: unknown parameter {name!r} (one of "
                             f"{', '.join(_PKCS11_PARAMETERS)})")
        if name in given:
            raise ValueError(f"pkcs11: {name} given twice")
        given[name] = value
    missing = [name for name in ("module", "token", "pin-file") if name not in given]
    if missing:
        raise ValueError(f"pkcs11: {missing[0]}= is required "
                         "(pkcs11:module=LIB;token=LABEL;pin-file=PATH)")
    module = Path(given["module"])
    if not module.is_absolute():
        raise ValueError(f"pkcs11: module={module}: give the library's absolute path")
    if len(given["token"].encode("utf-8")) > 32:
        raise ValueError("pkcs11: token=: a token label is at most 32 bytes")
    label = given.get("label", DEFAULT_PKCS11_LABEL)
    if not _LABEL.fullmatch(label):
        raise ValueError("pkcs11: label=: 1-64 letters, digits, '.', '_' or '-'")
    issue_version = None
    if "issue-version" in given:
        issue_version = _version(given["issue-version"], "pkcs11: issue-version")
    return Pkcs11Source(module, given["token"], Path(given["pin-file"]), label, issue_version)


def _version(text: str, where: str) -> int:
    if not re.fullmatch(r"[0-9]{1,3}", text) or not 0 <= int(text) <= 0xFF:
        raise ValueError(f"{where}: expected a key version 0-255, got {text[:20]!r}")
    if int(text) == TEST_KEY_VERSION:
        raise ValueError(f"{where}: version {TEST_KEY_VERSION:#x} is the published test key "
                         "version")
    return int(text)


def open_key_store(source: KeySource) -> SoftwareKeyStore | Pkcs11KeyStore:
    """The key store a source names; KeyFileError (one line naming the file, module or token)."""
    if isinstance(source, PublishedKeySource):
        return published_test_keys()
    if isinstance(source, KeyFileSource):
        return load_key_file(source.path)
    return open_pkcs11(source)


# ---- file keys ---------------------------------------------------------------------------------

def read_private_file(path: Path, what: str, max_bytes: int = _MAX_SECRET_FILE) -> bytes:
    """A secret file's bytes; KeyFileError naming it when it cannot be read or when its mode
    lets anyone but its owner in (group or other permission bits set)."""
    try:
        fd = open_regular(path)
    except UntrustedFileError as error:
        raise KeyFileError(f"{what} {error}") from None
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            raise KeyFileError(f"{what} {path}: mode {mode:04o} lets others read it: a {what} "
                               f"must be readable by its owner only (chmod 600 {path})")
        return read_fd_limited(fd, path, max_bytes)
    except UntrustedFileError as error:
        raise KeyFileError(f"{what} {error}") from None
    except OSError as error:
        raise KeyFileError(f"{what} {path}: cannot read: {error.strerror}") from None
    finally:
        os.close(fd)


def load_key_file(path: Path) -> SoftwareKeyStore:
    """Master keys from a TOML file (mode 0600: readable by the terminal's user only; a file
    others may read is refused)::

        issue_version = 1
        [master_keys]
        1 = "32 hex digits"
    """
    data = read_private_file(path, "key file")
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
        raise KeyFileError(f"{path}: not a TOML key file") from None
    keys = document.get("master_keys")
    issue_version = document.get("issue_version")
    if not isinstance(keys, dict) or not isinstance(issue_version, int):
        raise KeyFileError(f"{path}: expected issue_version = N and a [master_keys] table")
    master_keys = {}
    for version, text in keys.items():
        try:
            number = int(version, 10)
            key = bytes.fromhex(text) if isinstance(text, str) else b""
        except ValueError:
            raise KeyFileError(f"{path}: master_keys.{version}: expected a version number "
                               "and 32 hex digits") from None
        if not 0 <= number <= 0xFF or len(key) != KEY_SIZE:
            raise KeyFileError(f"{path}: master_keys.{version}: expected a version 0-255 "
                               "and 32 hex digits")
        if number == TEST_KEY_VERSION:
            raise KeyFileError(f"{path}: master_keys.{version}: version {TEST_KEY_VERSION:#x} is "
                               "the published test key version")
        master_keys[number] = key
    if issue_version not in master_keys:
        raise KeyFileError(f"{path}: issue_version {issue_version} has no key in [master_keys]")
    return SoftwareKeyStore(master_keys, issue_version)


def published_test_keys() -> SoftwareKeyStore:
    """The published test keys (see TEST_KEY_VERSION)."""
    return SoftwareKeyStore({TEST_KEY_VERSION: _TEST_MASTER_KEY}, TEST_KEY_VERSION)


# ---- keys in a PKCS#11 token ---------------------------------------------------------------------

class Pkcs11KeyStore:
    """Master keys that stay in a PKCS#11 token: a card's key is the token's CKM_AES_CMAC of the
    diversification message under the version's master key, byte for byte what
    :class:`SoftwareKeyStore` computes from the same master key. Derived card keys are kept in
    memory (the latest :data:`DERIVED_KEY_CACHE`), never written or logged."""

    def __init__(self, source: Pkcs11Source, session, keys: dict[int, object],
                 issue_version: int, mechanism: object, token_error: type[Exception]) -> None:
        self.source = source
        self.issue_version = issue_version
        self._session = session
        self._keys = keys  # version -> the token's key object (a handle: no key material)
        self._mechanism = mechanism  # CKM_AES_CMAC
        self._token_error = token_error
        self._derived: OrderedDict[tuple[int, bytes], bytes] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def versions(self) -> list[int]:
        return sorted(self._keys)

    def card_key(self, version: int, idm: bytes) -> bytes:
        """The card's diversified key; KeyError if the token has no such version."""
        master = self._keys[version]
        message = diversification_message(idm, SYSTEM_CODE_LITE_S)
        with self._lock:
            cached = self._derived.get((version, idm))
            if cached is not None:
                self._derived.move_to_end((version, idm))
                return cached
            if self._session is None:
                raise RuntimeError(f"{self.source}: the key store is closed")
            try:
                key = bytes(master.sign(message, mechanism=self._mechanism))
            except self._token_error as error:  # the token went away mid-run: a fault, exit 1
                raise RuntimeError(f"{self.source}: the token failed to derive a card key "
                                   f"({type(error).__name__})") from None
            if len(key) != KEY_SIZE:
                raise RuntimeError(f"{self.source}: the token's CMAC is {len(key)} bytes, not 16")
            self._derived[(version, idm)] = key
            if len(self._derived) > DERIVED_KEY_CACHE:
                self._derived.popitem(last=False)
            return key

    def is_test_version(self, version: int) -> bool:
        return version == TEST_KEY_VERSION

    def close(self) -> None:
        with self._lock:
            self._derived.clear()
            session, self._session = self._session, None
        if session is not None:
            try:
                session.close()
            except self._token_error:
                pass  # a token that is gone has closed the session itself

    def __repr__(self) -> str:
        return (f"Pkcs11KeyStore(token={self.source.token!r}, versions={self.versions}, "
                f"issue_version={self.issue_version})")


def open_pkcs11(source: Pkcs11Source) -> Pkcs11KeyStore:
    """Log in to the token and find its master keys (the AES keys labelled ``<label>-N``)."""
    try:
        import pkcs11
        from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
        from pkcs11.exceptions import (
            MultipleTokensReturned, NoSuchToken, PinIncorrect, PKCS11Error, UserAlreadyLoggedIn,
        )
    except ImportError:
        raise KeyFileError("pkcs11: python-pkcs11 is not installed (pip install "
                           "'farebox[pkcs11]')") from None
    pin = read_private_file(source.pin_file, "PIN file", 1024)
    try:
        pin_text = pin.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise KeyFileError(f"PIN file {source.pin_file}: not UTF-8 text") from None
    if not pin_text or "\n" in pin_text:
        raise KeyFileError(f"PIN file {source.pin_file}: expected the PIN alone on one line")
    where = f"pkcs11 token {source.token!r}"
    if not source.module.is_file():
        raise KeyFileError(f"pkcs11 module {source.module}: no such file")
    try:
        library = pkcs11.lib(str(source.module))
    except PKCS11Error:
        raise KeyFileError(f"pkcs11 module {source.module}: cannot be loaded as a PKCS#11 "
                           "library") from None
    session = None
    try:
        try:
            token = library.get_token(token_label=source.token)
        except NoSuchToken:
            raise KeyFileError(f"{where}: not found in {source.module} (is it initialised and "
                               "its token directory readable?)") from None
        except MultipleTokensReturned:
            raise KeyFileError(f"{where}: more than one token has this label") from None
        if Mechanism.AES_CMAC not in set(token.slot.get_mechanisms()):
            raise KeyFileError(f"{where}: the token cannot do AES-CMAC (CKM_AES_CMAC)")
        try:
            session = token.open(user_pin=pin_text)
        except PinIncorrect:
            raise KeyFileError(f"{where}: the PIN in {source.pin_file} is refused") from None
        except UserAlreadyLoggedIn:  # another store in this process logged in: share that
            session = token.open()
        keys: dict[int, object] = {}
        pattern = re.compile(re.escape(source.label) + r"-([0-9]{1,3})")
        for key in session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
            label = key[Attribute.LABEL]
            found = pattern.fullmatch(label or "")
            if found is None:
                continue
            version = _token_version(found.group(1), where, label)
            if key[Attribute.KEY_TYPE] != KeyType.AES or key[Attribute.VALUE_LEN] != KEY_SIZE:
                raise KeyFileError(f"{where}: key {label!r} is not an AES-128 key")
            if not key[Attribute.SIGN]:
                raise KeyFileError(f"{where}: key {label!r} may not sign (CKA_SIGN is false): "
                                   "the card-key CMAC needs it")
            if version in keys:
                raise KeyFileError(f"{where}: more than one key is labelled {label!r}")
            keys[version] = key
        if not keys:
            raise KeyFileError(f"{where}: no AES key labelled {source.label}-N (N the key "
                               "version) is visible after logging in")
        issue_version = source.issue_version if source.issue_version is not None else max(keys)
        if issue_version not in keys:
            raise KeyFileError(f"{where}: issue-version {issue_version}: no key labelled "
                               f"{source.label}-{issue_version}")
        store = Pkcs11KeyStore(source, session, keys, issue_version, Mechanism.AES_CMAC,
                               PKCS11Error)
        session = None
        return store
    except PKCS11Error as error:
        raise KeyFileError(f"{where}: {type(error).__name__} from the token") from None
    finally:
        if session is not None:
            try:
                session.close()
            except PKCS11Error:
                pass


def _token_version(text: str, where: str, label: str) -> int:
    try:
        return _version(text, f"{where}: key {label!r}")
    except ValueError as error:
        raise KeyFileError(str(error)) from None


assert len(_TEST_MASTER_KEY) == KEY_SIZE
