"""How a restored OS disk boots: BIOS, UEFI, both, or neither — read from the disk itself.

A target that must choose the machine's firmware (Azure: Generation 1 is BIOS,
Generation 2 UEFI) asks the disk rather than trusting a setting:

- **BIOS** when the first sector holds boot code: a BIOS runs the MBR's first 440
  bytes, so on an MBR disk, or on a GPT disk's protective MBR (GRUB's ``boot.img``,
  SYSLINUX's ``gptmbr.bin``), they must not be all zeros. A GPT "BIOS boot" partition
  (where GRUB keeps its core image) is noted as evidence but is not enough alone;
- **UEFI** when an EFI system partition (GPT type ``C12A7328-…``, or MBR type ``0xef``)
  holds a FAT filesystem, which is what a UEFI firmware reads its loader from.

The partition table is read by ``targets.verify.read_partitions`` (one parser for the
drill's checks and for this); a malformed one raises its ``PartitionTableError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from targets.verify import Table, detect_fs, read_partitions

ESP_GPT = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ESP_MBR = "0xef"
BIOS_BOOT_GPT = "21686148-6449-6E6F-744E-656564454649"
BOOT_CODE = 440  # the MBR's boot code area, before the disk signature and the table


@dataclass(frozen=True)
class BootMode:
    """What firmware can boot a disk, and the evidence read from it."""

    table: Table
    bios: bool
    uefi: bool
    evidence: tuple[str, ...]  # what was found (or missing), for the job's record

    @property
    def firmwares(self) -> tuple[str, ...]:
        """``bios`` and/or ``uefi``; empty when neither can boot the disk."""
        return tuple(f for f, ok in (("bios", self.bios), ("uefi", self.uefi)) if ok)

    def choose(self, preferred: str) -> str | None:
        """``preferred`` if the disk boots with it, else the one it boots with; None if
        it boots with neither."""
        if preferred in self.firmwares:
            return preferred
        return self.firmwares[0] if self.firmwares else None

    def describe(self) -> str:
        return "; ".join(self.evidence)


def detect_boot(image: Path) -> BootMode:
    """The firmware that can boot ``image`` (a raw disk). Blocking: reads a few sectors
    per partition. Raises ``PartitionTableError`` for a malformed partition table."""
    table, parts = read_partitions(image)
    evidence: list[str] = []
    if table == "none":
        return BootMode(table, False, False, (
            "a filesystem on the whole disk, no partition table: no boot code and no EFI "
            "system partition",))
    with open(image, "rb") as f:
        code = f.read(BOOT_CODE)
        bios = any(code)
        where = "protective MBR" if table == "gpt" else "MBR"
        evidence.append(f"boot code in the {where}" if bios else f"no boot code in the {where}")
        if table == "gpt" and any(p.type == BIOS_BOOT_GPT for p in parts):
            n = next(p.number for p in parts if p.type == BIOS_BOOT_GPT)
            evidence.append(f"BIOS boot partition {n}")
        uefi = False
        esps = [p for p in parts if p.type.lower() in (ESP_GPT.lower(), ESP_MBR)]
        for p in esps:
            fs = detect_fs(f, p.start)
            if fs == "vfat":
                uefi = True
                evidence.append(f"EFI system partition {p.number} (FAT)")
            else:
                evidence.append(f"EFI system partition {p.number} holds no FAT filesystem "
                                f"({fs})")
        if not esps:
            evidence.append("no EFI system partition")
    return BootMode(table, bios, uefi, tuple(evidence))

