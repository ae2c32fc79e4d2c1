"""Where each area lives in the 14 user blocks (0x00-0x0D) of a FeliCa Lite-S card.

    0x00-0x01  identity       24 bytes of fields + 8-byte MAC, written once at issue
    0x02-0x03  purse slot 0   24 bytes of fields + 8-byte MAC
    0x04-0x05  purse slot 1   the same; the valid slot with the higher counter is current
    0x06-0x0B  log ring       six entries of 8 bytes + 8-byte MAC; entry for counter c at 6 + c % 6
                              (an entry carries its counter mod 256 to tell it from a stale one)
    0x0C-0x0D  in-journey     reserved (zeros) for entry/exit records

Every change after issue writes the *other* purse slot (2 blocks) and one log block, so a torn
write can only leave the old state or the new one.
"""

BLOCK_SIZE = 16
USER_BLOCKS = 14
MAC_SIZE = 8

IDENTITY_BLOCKS = (0x00, 0x01)
PURSE_SLOT_BLOCKS = ((0x02, 0x03), (0x04, 0x05))
LOG_FIRST_BLOCK = 0x06
LOG_ENTRIES = 6
LOG_BLOCKS = tuple(range(LOG_FIRST_BLOCK, LOG_FIRST_BLOCK + LOG_ENTRIES))
JOURNEY_BLOCKS = (0x0C, 0x0D)

#: What a payment or add value needs: identity and both purse slots (two Read commands).
TAP_READ_BLOCKS = IDENTITY_BLOCKS + PURSE_SLOT_BLOCKS[0] + PURSE_SLOT_BLOCKS[1]
#: What ``card show`` needs: everything with data in it.
FULL_READ_BLOCKS = TAP_READ_BLOCKS + LOG_BLOCKS

# Area tags bound into every MAC so that no area's bytes verify as another's.
AREA_IDENTITY = 0x01
AREA_PURSE = 0x02
AREA_LOG = 0x03


def log_block_for(counter: int) -> int:
    return LOG_FIRST_BLOCK + counter % LOG_ENTRIES


assert len(IDENTITY_BLOCKS + PURSE_SLOT_BLOCKS[0] + PURSE_SLOT_BLOCKS[1] + LOG_BLOCKS
           + JOURNEY_BLOCKS) == USER_BLOCKS
