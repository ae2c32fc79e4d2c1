"""The PKCS#11 key store against a real token: SoftHSM2 (Debian's ``softhsm2``, which bootstrap.sh
installs; no skip). Each test module makes a private token directory with its own softhsm2.conf
(``SOFTHSM2_CONF``), initialises a token with ``softhsm2-util`` and puts master keys in it; the
card keys the token derives (CKM_AES_CMAC inside it) must be byte for byte those the file key
store derives from the same master keys.

:class:`SoftHsm` is also what tests/tools/test_cli_keys.py drives the CLI with."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from farebox.cardimage.mac import diversify_key
from farebox.protocol.frames import SYSTEM_CODE_LITE_S
from farebox.terminal.card.keys import (
    DEFAULT_PKCS11_LABEL, TEST_KEY_VERSION, KeyFileError, KeyFileSource, Pkcs11KeyStore,
    Pkcs11Source, SoftwareKeyStore, PublishedKeySource, open_key_store, open_pkcs11,
    parse_key_source,
)

#: Debian's softhsm2 package puts its PKCS#11 module here (a link to the multiarch path)
MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
UTIL = "softhsm2-util"


@dataclass
class SoftHsm:
    """A private SoftHSM2 token directory: ``env`` points a process at it."""
    directory: Path
    token: str = "farebox"
    pin: str = "4711-0815"
    so_pin: str = "so-pin-0000"

    @property
    def conf(self) -> Path:
        return self.directory / "softhsm2.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def init(self) -> SoftHsm:
        assert shutil.which(UTIL), f"{UTIL} is missing: bootstrap.sh installs softhsm2"
        assert MODULE.exists(), f"{MODULE} is missing: bootstrap.sh installs softhsm2"
        (self.directory / "tokens").mkdir(parents=True)
        self.conf.write_text(f"directories.tokendir = {self.directory / 'tokens'}\n"
                             "objectstore.backend = file\nlog.level = ERROR\n")
        self.util("--init-token", "--free", "--label", self.token, "--pin", self.pin,
                  "--so-pin", self.so_pin)
        return self

    def util(self, *argv: str) -> str:
        done = subprocess.run([UTIL, *argv], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **self.env})
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def import_key(self, label: str, key: bytes) -> None:
        """The operator's way: ``softhsm2-util --import FILE --aes`` (the raw key in a file that
        is removed again). SoftHSM 2.6's util stops at the key's first zero byte (a 2-byte key
        from 8a3f00...), which the key store then refuses as not AES-128: keys here have none."""
        assert 0 not in key, "softhsm2-util --import --aes cuts a key at its first zero byte"
        raw = self.directory / "import.bin"
        descriptor = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key)
        try:
            self.util("--import", str(raw), "--aes", "--token", self.token, "--label", label,
                      "--id", secrets.token_hex(4), "--pin", self.pin)
        finally:
            raw.unlink()

    def pin_file(self, pin: str | None = None, mode: int = 0o600, name: str = "pin") -> Path:
        path = self.directory / name
        path.write_text((self.pin if pin is None else pin) + "\n")
        path.chmod(mode)
        return path

    def spec(self, pin_file: Path | None = None, **extra: str) -> str:
        parts = [f"module={MODULE}", f"token={self.token}",
                 f"pin-file={pin_file or self.pin_file()}"]
        parts += [f"{name.replace('_', '-')}={value}" for name, value in extra.items()]
        return "pkcs11:" + ";".join(parts)


MASTER_1 = bytes.fromhex("00112233445566778899aabbccddeeff")
MASTER_2 = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")


@pytest.fixture(scope="module")
def hsm(tmp_path_factory):
    """A token holding MASTER_1 (version 1, imported through python-pkcs11 with CKA_VALUE) and
    MASTER_2 (version 2, through softhsm2-util --import --aes), with this process's PKCS#11
    library (re)initialised on its token directory."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass

    token = SoftHsm(tmp_path_factory.mktemp("softhsm")).init()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTHSM2_CONF", str(token.conf))
        library = pkcs11.lib(str(MODULE))
        library.reinitialize()  # another module may have initialised it on another directory
        with library.get_token(token_label=token.token).open(rw=True,
                                                             user_pin=token.pin) as session:
            session.create_object({
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                Attribute.TOKEN: True, Attribute.LABEL: f"{DEFAULT_PKCS11_LABEL}-1",
                Attribute.VALUE: MASTER_1, Attribute.SIGN: True, Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False})
            # a key of another application, with a label that is not ours: ignored
            session.create_object({
                Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                Attribute.TOKEN: True, Attribute.LABEL: "backup-wrapping-key",
                Attribute.VALUE: secrets.token_bytes(32), Attribute.SIGN: True})
        token.import_key(f"{DEFAULT_PKCS11_LABEL}-2", MASTER_2)
        yield token
        library.reinitialize()


def software() -> SoftwareKeyStore:
    return SoftwareKeyStore({1: MASTER_1, 2: MASTER_2}, 2)


def test_the_token_derives_byte_identical_card_keys_to_the_file_store(hsm):
    store = open_pkcs11(parse_key_source(hsm.spec()))
    try:
        assert isinstance(store, Pkcs11KeyStore)
        assert store.versions == [1, 2] and store.issue_version == 2  # the highest by default
        reference = software()
        idms = [secrets.token_bytes(8) for _ in range(200)] + [bytes(8), b"\xff" * 8]
        for idm in idms:
            for version in (1, 2):
                assert store.card_key(version, idm) == reference.card_key(version, idm)
        # and the reference is the AN10922 derivation itself, not a shared mistake
        assert reference.card_key(1, bytes(8)) == diversify_key(MASTER_1, bytes(8),
                                                                SYSTEM_CODE_LITE_S)
        assert store.card_key(1, idms[0]) != store.card_key(2, idms[0])
        assert store.card_key(1, idms[0]) != store.card_key(1, idms[1])
        with pytest.raises(KeyError):
            store.card_key(3, idms[0])  # no such version: the card is not ours
        assert store.is_test_version(TEST_KEY_VERSION) and not store.is_test_version(1)
    finally:
        store.close()


def test_the_issue_version_can_be_chosen_and_must_exist(hsm):
    store = open_pkcs11(parse_key_source(hsm.spec(issue_version="1")))
    assert store.issue_version == 1
    store.close()
    with pytest.raises(KeyFileError, match="issue-version 7: no key labelled farebox-master-7"):
        open_pkcs11(parse_key_source(hsm.spec(issue_version="7")))


def test_a_closed_store_derives_nothing_and_keys_never_show(hsm):
    store = open_key_store(parse_key_source(hsm.spec()))
    idm = secrets.token_bytes(8)
    derived = store.card_key(1, idm)
    shown = repr(store) + str(store.source)
    for secret in (MASTER_1, MASTER_2, derived):
        assert secret.hex() not in shown.lower() and repr(secret) not in shown
    assert "versions=[1, 2]" in repr(store)
    store.close()
    store.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        store.card_key(1, secrets.token_bytes(8))


def test_two_stores_in_one_process_share_the_login(hsm):
    first = open_pkcs11(parse_key_source(hsm.spec()))
    second = open_pkcs11(parse_key_source(hsm.spec()))
    idm = secrets.token_bytes(8)
    try:
        assert first.card_key(2, idm) == second.card_key(2, idm)
    finally:
        second.close()
        first.close()


@pytest.mark.parametrize(("change", "message"), [
    ({"pin": "0000-0000"}, "the PIN in {pin_file} is refused"),
    ({"token": "nosuchtoken"}, "pkcs11 token 'nosuchtoken': not found"),
    ({"label": "other-master"}, "no AES key labelled other-master-N"),
    ({"module": "/nonexistent/libpkcs11.so"}, "pkcs11 module /nonexistent/libpkcs11.so: no such"),
    ({"module": "/etc/passwd"}, "pkcs11 module /etc/passwd: cannot be loaded"),
    ({"pin_mode": 0o640}, "PIN file {pin_file}: mode 0640 lets others read it"),
    ({"pin_mode": 0o604}, "PIN file {pin_file}: mode 0604 lets others read it"),
    ({"pin": ""}, "PIN file {pin_file}: expected the PIN alone on one line"),
])
def test_a_token_that_cannot_be_used_is_one_line_naming_it(hsm, change, message):
    pin_file = hsm.pin_file(change.get("pin"), change.get("pin_mode", 0o600), name="pin-case")
    source = parse_key_source(hsm.spec(pin_file))
    source = Pkcs11Source(Path(change.get("module", source.module)),
                          change.get("token", source.token), source.pin_file,
                          change.get("label", source.label))
    with pytest.raises(KeyFileError) as raised:
        open_pkcs11(source)
    text = str(raised.value)
    assert message.format(pin_file=pin_file) in text and "\n" not in text
    assert hsm.pin not in text and "0000-0000" not in text


def test_keys_that_do_not_fit_are_refused(hsm):
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass

    cases = [("testversion", 240, {Attribute.VALUE: secrets.token_bytes(16)},
              "version 0xf0 is the published test key version"),
             ("aes256", 3, {Attribute.VALUE: secrets.token_bytes(32)}, "not an AES-128 key"),
             ("nosign", 4, {Attribute.VALUE: secrets.token_bytes(16), Attribute.SIGN: False},
              r"may not sign \(CKA_SIGN is false\)"),
             ("twice", 5, {Attribute.VALUE: secrets.token_bytes(16)}, "more than one key")]
    token = pkcs11.lib(str(MODULE)).get_token(token_label=hsm.token)
    with token.open(rw=True, user_pin=hsm.pin) as session:
        for prefix, version, attributes, _ in cases:
            for _ in range(2 if prefix == "twice" else 1):
                session.create_object({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                       Attribute.KEY_TYPE: KeyType.AES, Attribute.TOKEN: True,
                                       Attribute.SIGN: True, Attribute.LABEL: f"{prefix}-{version}",
                                       **attributes})
    for prefix, _, _, message in cases:
        with pytest.raises(KeyFileError, match=message):
            open_pkcs11(parse_key_source(hsm.spec(label=prefix)))


@pytest.mark.parametrize(("text", "message"), [
    ("pkcs11:", "module= is required"),
    ("pkcs11:module=/lib/x.so;token=t", "pin-file= is required"),
    ("pkcs11:module=lib.so;token=t;pin-file=/p", "give the library's absolute path"),
    ("pkcs11:module=/lib/x.so;token=t;pin-file=/p;pin=1234", "unknown parameter 'pin'"),
    ("pkcs11:module=/lib/x.so;token=t;token=u;pin-file=/p", "token given twice"),
    ("pkcs11:module=/lib/x.so;token=t;pin-file=/p;label=a b", "label=: 1-64 letters"),
    ("pkcs11:module=/lib/x.so;token=t;pin-file=/p;issue-version=240", "published test key"),
    ("pkcs11:module=/lib/x.so;token=t;pin-file=/p;issue-version=256", "key version 0-255"),
    ("pkcs11:module=/lib/x.so;token=" + "t" * 33 + ";pin-file=/p", "at most 32 bytes"),
    ("pkcs11:module=/lib/x.so;token", "expected NAME=VALUE"),
    ("file:", "file: needs a path"),
    ("vault:x", 'expected "test", "file:PATH" or "pkcs11:'),
])
def test_key_sources_that_do_not_parse_say_why(text, message):
    with pytest.raises(ValueError, match=message):
        parse_key_source(text)


def test_key_sources_parse():
    assert parse_key_source("test") == PublishedKeySource()
    assert parse_key_source("file:/etc/farebox/keys.toml") == KeyFileSource(
        Path("/etc/farebox/keys.toml"))
    assert parse_key_source(" pkcs11:module=/m.so; token=farebox ;pin-file=/etc/farebox/pin;"
                            "label=bus.keys;issue-version=3;".strip()) == Pkcs11Source(
        Path("/m.so"), "farebox", Path("/etc/farebox/pin"), "bus.keys", 3)
