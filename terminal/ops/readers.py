"""Which readers this machine has: nfcpy USB readers (found in sysfs, the way nfcpy's own
``usb`` probe finds them: by vendor/product id) and PC/SC readers (listed by pcscd through
pyscard, which honours ``PCSCLITE_CSOCK_NAME``), each with whether it is usable and, if not,
why. The filesystem roots are parameters so that tests can build a fake ``/sys`` and ``/dev``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

#: nfcpy's USB readers (nfc/clf/device.py usb_device_map), used when nfcpy is not installed
_NFCPY_USB_FALLBACK = {
    (0x054C, 0x0193): "pn531", (0x04CC, 0x0531): "pn531", (0x04CC, 0x2533): "pn533",
    (0x04E6, 0x5591): "pn533", (0x04E6, 0x5593): "pn533", (0x054C, 0x02E1): "rcs956",
    (0x054C, 0x06C1): "rcs380", (0x054C, 0x06C3): "rcs380", (0x072F, 0x2200): "acr122",
}
#: kernel drivers that claim a reader nfcpy wants (docs/readers.md, "nfcpy")
KERNEL_DRIVERS = ("port100", "pn533_usb")
DEFAULT_PCSCD_SOCKET = "/run/pcscd/pcscd.comm"


def nfcpy_usb_devices() -> dict[tuple[int, int], str]:
    try:
        from nfc.clf.device import usb_device_map
    except ImportError:
        return dict(_NFCPY_USB_FALLBACK)
    return dict(usb_device_map)


@dataclass(frozen=True)
class Roots:
    """Where the kernel's views live (a test points these at a fake tree)."""

    sys: Path = Path("/sys")
    dev: Path = Path("/dev")
    run: Path = Path("/run")
    etc: Path = Path("/etc")
    usr: Path = Path("/usr")


@dataclass
class UsbReader:
    vid: int
    pid: int
    bus: int
    device: int
    driver: str  # nfcpy's driver name
    product: str | None
    devnode: Path
    kernel_driver: str | None  # a kernel module bound to one of its interfaces
    accessible: bool

    @property
    def path(self) -> str:
        return f"usb:{self.bus:03d}:{self.device:03d}"

    @property
    def id_path(self) -> str:
        return f"usb:{self.vid:04x}:{self.pid:04x}"

    @property
    def problems(self) -> list[str]:
        out = []
        if not self.accessible:
            out.append(f"no read/write permission on {self.devnode}")
        if self.kernel_driver:
            out.append(f"kernel module {self.kernel_driver} holds it")
        return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None


def usb_readers(roots: Roots = Roots()) -> list[UsbReader]:
    """Every USB device nfcpy has a driver for, from ``/sys/bus/usb/devices``."""
    known = nfcpy_usb_devices()
    base = roots.sys / "bus" / "usb" / "devices"
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        if ":" in entry.name:  # an interface, not a device
            continue
        vid, pid = _read(entry / "idVendor"), _read(entry / "idProduct")
        bus, dev = _read(entry / "busnum"), _read(entry / "devnum")
        try:
            key = (int(vid, 16), int(pid, 16))
            bus_number, dev_number = int(bus), int(dev)
        except (TypeError, ValueError):
            continue
        if key not in known:
            continue
        devnode = roots.dev / "bus" / "usb" / f"{bus_number:03d}" / f"{dev_number:03d}"
        kernel_driver = None
        for interface in sorted(base.glob(f"{entry.name}:*")):
            link = interface / "driver"
            if link.exists() or link.is_symlink():
                name = os.path.basename(os.readlink(link)) if link.is_symlink() else link.name
                if name in KERNEL_DRIVERS:
                    kernel_driver = name
        accessible = os.access(devnode, os.R_OK | os.W_OK)
        found.append(UsbReader(key[0], key[1], bus_number, dev_number, known[key],
                               _read(entry / "product"), devnode, kernel_driver, accessible))
    return found


#: serial devices an nfcpy tty reader (PN532 board or HAT, Arygon) may sit on
TTY_PATTERNS = ("ttyUSB*", "ttyACM*", "ttyAMA*", "serial0")  # serial0: the Pi's UART alias


@dataclass
class TtyDevice:
    device: Path
    accessible: bool

    @property
    def path(self) -> str:
        """nfcpy's tty path with the PN532 driver (``tty:USB0:pn532``): the usual Pi board."""
        return f"tty:{self.device.name.removeprefix('tty')}:pn532"


def tty_devices(roots: Roots = Roots()) -> list[TtyDevice]:
    """Serial devices an nfcpy tty reader may be on. Not probed: probing writes to the port,
    and only the operator knows what is attached there."""
    found: dict[Path, TtyDevice] = {}
    for pattern in TTY_PATTERNS:
        for device in sorted(roots.dev.glob(pattern)):
            real = device.resolve() if device.is_symlink() else device  # serial0 -> ttyS0
            found.setdefault(real, TtyDevice(real, os.access(real, os.R_OK | os.W_OK)))
    return list(found.values())


@dataclass
class PcscReader:
    name: str
    card_present: bool | None  # None: could not tell
    atr: str | None = None
    problem: str | None = None

    @property
    def path(self) -> str:
        return f"pcsc:{self.name}"


@dataclass
class PcscStatus:
    available: bool  # pcscd answered
    socket: str
    readers: list[PcscReader] = field(default_factory=list)
    problem: str | None = None


def pcscd_socket() -> str:
    return os.environ.get("PCSCLITE_CSOCK_NAME", DEFAULT_PCSCD_SOCKET)


def pcsc_readers(probe_cards: bool = True) -> PcscStatus:
    """The readers pcscd lists; pcscd not running (or pyscard missing) is a finding in
    ``problem``, never an exception."""
    socket = pcscd_socket()
    try:
        from smartcard.Exceptions import CardConnectionException, NoCardException
        from smartcard.System import readers
    except ImportError:
        return PcscStatus(False, socket, problem="pyscard is not installed (pip install "
                                                  "'farebox[pcsc]')")
    try:
        listed = readers()
    except Exception as error:  # EstablishContextException, ListReadersException: no pcscd
        message = " ".join(str(error).split()) or type(error).__name__
        return PcscStatus(False, socket, problem=f"pcscd does not answer on {socket} ({message})")
    status = PcscStatus(True, socket)
    for reader in listed:
        entry = PcscReader(str(reader), None)
        if probe_cards:
            connection = reader.createConnection()
            try:
                connection.connect()
                entry.card_present = True
                entry.atr = bytes(connection.getATR()).hex()
            except NoCardException:
                entry.card_present = False
            except CardConnectionException as error:
                entry.problem = " ".join(str(error).split())
            except Exception as error:  # a reader pcscd lists but cannot use
                entry.problem = f"{type(error).__name__}: {' '.join(str(error).split())}"
            finally:
                try:
                    connection.disconnect()
                except Exception:
                    pass
        status.readers.append(entry)
    return status


def pcscd_holds(usb: UsbReader, pcsc: PcscStatus) -> str | None:
    """The PC/SC reader name under which pcscd holds ``usb`` (a reader nfcpy wants), if it
    does: pcscd's CCID driver names ACR122U readers ``ACS ACR122U ...``."""
    if not pcsc.available:
        return None
    hints = {"acr122": ("ACR122",), "pn533": ("PN533", "SCL3711", "SCL3712"),
             "pn531": ("PN531", "SCL3710"), "rcs380": ("RC-S380",), "rcs956": ("RC-S3",)}
    for reader in pcsc.readers:
        if any(h.lower() in reader.name.lower() for h in hints.get(usb.driver, ())):
            return reader.name
    return None
