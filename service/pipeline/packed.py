"""The ledger's ``done`` entries, packed: about 100 bytes per device instead of an object.

A partition's ledger holds one entry per device swapped within the retention, and almost all of
them are ``done``: nothing is due, and the entry only answers "is this swap the latest?" when a
swap of the device arrives. As Python objects (an ``Entry``, its tuple, its strings, a dict
slot) such an entry cost 775 bytes of RSS (docs/benchmarks.md, section 11; 99 bytes packed).
Here it is one record in a byte blob, found through an open-addressing table of offsets:

    record = length u16 | key length u8 | timeMs i64 | offset i64 | source u16 | outcome u16
             | eventId length u8 | nodeId length u8 | key | eventId | nodeId

Texts are UTF-8, or, for a canonical lowercase UUID, the byte 0xFF (never in UTF-8) and its 16
bytes. The CloudEvent source and the outcome are indexes into a small table of distinct strings.
An entry that does not fit (a text over 254 bytes, a source or outcome over 256 characters or
past the table's bound, a field of another type) is not packed: the ledger keeps it as an
object, as before.

The ledger builds an ``Entry`` from a record only when it is asked for (a swap of the device
arrived, a record of it is written). Replacing or removing a record leaves its bytes unused in the
blob; the blob is rewritten once the unused bytes outgrow the used ones.

The blob is a list of fixed-size chunks, and a record's offset is its chunk's index times the
chunk size plus its position in it (a record never spans two chunks).
"""

from __future__ import annotations

import struct
from array import array
from typing import Final

_EMPTY: Final = -1
_DELETED: Final = -2
_UUID: Final = 0xFF
_HEAD: Final = struct.Struct("<HBqqHHBB")
"""Record length, key length, timeMs, offset, source, outcome, eventId length, nodeId length."""
_KEY: Final = _HEAD.size  # where the key starts in a record
_TIME_MS: Final = struct.Struct("<q")
_TIME_AT: Final = 3  # where timeMs starts in a record (after its length and key length)
_MAX_TEXT: Final = 254
MAX_STRINGS: Final = 4_096
"""Distinct sources and outcomes packed by index (a fleet has a handful of producers); an entry
with another one stays an object."""
MAX_STRING_CHARS: Final = 256
DoneFields = tuple[str, str, tuple[int, int], str, str | None]
"""A done entry's eventId, source, order (CloudEvent time ms, input offset), nodeId, outcome."""
_MIN_SLOTS: Final = 8
_MIN_GARBAGE: Final = 1 << 20
_CHUNK_BITS: Final = 18
_CHUNK: Final = 1 << _CHUNK_BITS
"""The blob is a list of 256 KiB chunks filled in place, so that growing it never copies tens of
MiB (nor needs them twice for a moment)."""
_POS: Final = _CHUNK - 1


def pack_text(text: str) -> bytes | None:
    """``text`` as stored in a record; None when it does not fit."""
    if (
        len(text) == 36
        and text[8] == "-"
        and text[13] == "-"
        and text[18] == "-"
        and text[23] == "-"
    ):
        digits = text.replace("-", "")
        if len(digits) == 32:
            try:
                raw = bytes.fromhex(digits)
            except ValueError:
                raw = b""
            if len(raw) == 16 and raw.hex() == digits:
                return b"\xff" + raw
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return None
    return data if len(data) <= _MAX_TEXT else None


def unpack_text(data: bytes) -> str:
    if len(data) == 17 and data[0] == _UUID:
        h = data[1:].hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return data.decode("utf-8")


class PackedEntries:
    """``done`` entries by device, packed (see the module's docstring)."""

    __slots__ = (
        "_chunks",
        "_count",
        "_cursor",
        "_fill",
        "_garbage",
        "_slots",
        "_string_ids",
        "_strings",
        "_used",
    )

    def __init__(self) -> None:
        # One record per packed device (bounded by the devices of the partition) plus the bytes
        # of replaced records, at most as many as the live ones (then the blob is rewritten).
        self._chunks: list[bytearray] = []
        self._fill = _CHUNK  # bytes used in the last chunk (a full one: none yet)
        # Offsets of the records in the blob: at least 1.5 slots per packed device (rebuilt to
        # 2 to 4 when used slots, deleted marks included, reach two thirds).
        self._slots = array("q", [_EMPTY]) * _MIN_SLOTS
        self._count = 0  # packed devices
        self._used = 0  # slots not empty: packed devices and deleted marks
        self._garbage = 0  # bytes of the blob no slot points to
        # index 0 is None (no outcome); at most MAX_STRINGS, then entries with others stay objects
        self._strings: list[str | None] = [None]
        self._string_ids: dict[str, int] = {}
        self._cursor = 0  # the next slot the expiry sweep looks at (it wraps)

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes held by the blob and the table."""
        return _CHUNK * len(self._chunks) + self._slots.itemsize * len(self._slots)

    @property
    def _size(self) -> int:
        """Bytes of the blob written so far."""
        return _CHUNK * (len(self._chunks) - 1) + self._fill if self._chunks else 0

    def _append(self, record: bytes) -> int:
        """Write ``record`` at the blob's end; its offset."""
        size = len(record)
        if self._fill + size > _CHUNK:
            self._garbage += _CHUNK - self._fill if self._chunks else 0  # the chunk's tail
            self._chunks.append(bytearray(_CHUNK))
            self._fill = 0
        chunk = self._chunks[-1]
        chunk[self._fill : self._fill + size] = record
        off = (len(self._chunks) - 1) << _CHUNK_BITS | self._fill
        self._fill += size
        return off

    # ---- lookups ---------------------------------------------------------------------------

    def _probe(self, key: bytes) -> tuple[int, int]:
        """(the slot holding ``key`` or -1, the first free slot on its probe path)."""
        slots, chunks = self._slots, self._chunks
        mask = len(slots) - 1
        size = len(key)
        i = hash(key) & mask
        free = -1
        while True:
            off = slots[i]
            if off == _EMPTY:
                return -1, (i if free < 0 else free)
            if off == _DELETED:
                if free < 0:
                    free = i
            else:
                chunk, pos = chunks[off >> _CHUNK_BITS], off & _POS
                if chunk[pos + 2] == size and chunk[pos + _KEY : pos + _KEY + size] == key:
                    return i, free
            i = (i + 1) & mask

    def __contains__(self, device: str) -> bool:
        key = pack_text(device)
        return key is not None and self._probe(key)[0] >= 0

    def get(self, device: str) -> DoneFields | None:
        key = pack_text(device)
        if key is None:
            return None
        slot, _ = self._probe(key)
        if slot < 0:
            return None
        return self._entry(self._slots[slot])

    def _entry(self, off: int) -> DoneFields:
        blob, off = self._chunks[off >> _CHUNK_BITS], off & _POS
        _, key_size, time_ms, offset, source, outcome, event_size, node_size = _HEAD.unpack_from(
            blob, off
        )
        start = off + _KEY + key_size
        event_id = unpack_text(bytes(blob[start : start + event_size]))
        start += event_size
        node_id = unpack_text(bytes(blob[start : start + node_size]))
        return (
            event_id,
            self._strings[source] or "",
            (time_ms, offset),
            node_id,
            self._strings[outcome],
        )

    def older_than(self, horizon_ms: int, scan: int, limit: int) -> list[str]:
        """Devices whose entry's time (its swap's CloudEvent ``time``) is before
        ``horizon_ms``: at most ``limit`` of them, found among the next ``scan`` slots after
        where the previous call stopped. The cursor wraps, so repeated calls visit every slot;
        a rebuild reorders the table, and an entry it moves behind the cursor is found on the
        next round. Nothing is removed here."""
        slots, chunks = self._slots, self._chunks
        size = len(slots)
        i = self._cursor % size
        found: list[str] = []
        for _ in range(min(scan, size)):
            off = slots[i]
            i = (i + 1) % size
            if off < 0:
                continue
            chunk, pos = chunks[off >> _CHUNK_BITS], off & _POS
            if _TIME_MS.unpack_from(chunk, pos + _TIME_AT)[0] < horizon_ms:
                found.append(unpack_text(bytes(chunk[pos + _KEY : pos + _KEY + chunk[pos + 2]])))
                if len(found) >= limit:
                    break
        self._cursor = i
        return found

    # ---- changes ---------------------------------------------------------------------------

    def put(self, device: str, done: DoneFields) -> bool:
        """Pack a ``done`` entry of ``device`` (replacing its packed one); False when it does
        not fit (the caller keeps it otherwise, and the packed one is removed)."""
        event_id, source, order, node_id, outcome = done
        key = pack_text(device)
        if key is None:
            return False
        event = pack_text(event_id)
        node = pack_text(node_id)
        ids = self._string_ids
        source_id = ids.get(source) or self._string_id(source)
        outcome_id = 0 if outcome is None else ids.get(outcome) or self._string_id(outcome)
        if event is None or node is None or source_id is None or outcome_id is None:
            self.discard(device)
            return False
        size = _KEY + len(key) + len(event) + len(node)
        try:
            head = _HEAD.pack(
                size, len(key), order[0], order[1], source_id, outcome_id, len(event), len(node)
            )
        except struct.error:  # an int past 64 bits
            self.discard(device)
            return False
        slot, free = self._probe(key)
        slots = self._slots
        if slot >= 0:
            self._drop(slot)
        else:
            slot = free
            if slots[slot] == _EMPTY:
                self._used += 1
        fill = self._fill
        if fill + size > _CHUNK:  # (_append, inline: this is the load's inner loop)
            self._garbage += _CHUNK - fill if self._chunks else 0  # the chunk's tail
            self._chunks.append(bytearray(_CHUNK))
            fill = 0
        chunk = self._chunks[-1]
        chunk[fill : fill + size] = b"".join((head, key, event, node))
        slots[slot] = (len(self._chunks) - 1) << _CHUNK_BITS | fill
        self._fill = fill + size
        self._count += 1
        if self._used * 3 >= len(slots) * 2 or self._garbage > _MIN_GARBAGE:
            self._tidy()
        return True

    def discard(self, device: str) -> None:
        key = pack_text(device)
        if key is None or not self._count:
            return
        slot, _ = self._probe(key)
        if slot >= 0:
            self._drop(slot)
            self._tidy()

    def _drop(self, slot: int) -> None:
        off = self._slots[slot]
        chunk, pos = self._chunks[off >> _CHUNK_BITS], off & _POS
        self._garbage += chunk[pos] | chunk[pos + 1] << 8
        self._slots[slot] = _DELETED
        self._count -= 1

    def _tidy(self) -> None:
        if self._used * 3 >= len(self._slots) * 2 or (
            self._garbage > _MIN_GARBAGE and self._garbage * 2 > self._size
        ):
            self._rebuild()

    def _string_id(self, text: str) -> int | None:
        found = self._string_ids.get(text)
        if found is not None:
            return found
        if len(self._strings) > MAX_STRINGS or len(text) > MAX_STRING_CHARS:
            return None
        self._strings.append(text)
        self._string_ids[text] = len(self._strings) - 1
        return len(self._strings) - 1

    def _rebuild(self) -> None:
        """A table sized for twice the packed devices, and a blob without unused bytes when
        they outgrew the used ones."""
        old_slots, chunks = self._slots, self._chunks
        size = _MIN_SLOTS
        while size < self._count * 2:
            size *= 2
        slots = array("q", [_EMPTY]) * size
        mask = size - 1
        rewrite = self._garbage * 2 > self._size
        if rewrite:
            self._chunks, self._fill, self._garbage = [], _CHUNK, 0
        for off in old_slots:
            if off < 0:
                continue
            chunk, pos = chunks[off >> _CHUNK_BITS], off & _POS
            i = hash(bytes(chunk[pos + _KEY : pos + _KEY + chunk[pos + 2]])) & mask
            while slots[i] != _EMPTY:
                i = (i + 1) & mask
            size = chunk[pos] | chunk[pos + 1] << 8
            slots[i] = self._append(bytes(chunk[pos : pos + size])) if rewrite else off
        self._slots = slots
        self._used = self._count
