"""Audio container headers, read without decoding: the evidence that a file was cut short.

A decoder handed a truncated file often stops early without complaint and returns a
short clip. The container knows better: a WAV ``data`` chunk declares its size in
bytes, every Ogg logical stream (Vorbis, Opus) closes with a page flagged
end-of-stream, and FLAC's STREAMINFO block declares the total number of frames.
Each function here reads headers only, from a seekable binary file, so a check costs
a few small reads per page at most, whatever the length of the audio.
"""

from __future__ import annotations

from typing import BinaryIO

OGG_CAPTURE = b"OggS"
OGG_HEADER_BYTES = 27  # an Ogg page header before its segment table
OGG_BEGIN_OF_STREAM = 0x02  # header_type flag of a logical stream's first page
OGG_END_OF_STREAM = 0x04  # header_type flag of a logical stream's last page
_SEARCH_CHUNK = 1 << 16


def sniff_container(handle: BinaryIO) -> str | None:
    """The container from a file's first bytes: ``"wav"``, ``"ogg"``, ``"flac"``, or None for any other.

    The content decides, not the name: an upload's extension may lie.
    """
    handle.seek(0)
    head = handle.read(12)
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == OGG_CAPTURE:
        return "ogg"
    if _flac_marker(handle) is not None:
        return "flac"
    return None


def header_cut(handle: BinaryIO, *, container: str | None, size: int) -> str | None:
    """Why a file of ``size`` bytes is cut short by its container headers alone, or None.

    WAV: the ``data`` chunk declares more bytes than follow it. Ogg: see
    :func:`ogg_cut`. FLAC needs the decoded length (:func:`decoded_cut`) and other
    containers have no such header, so both give None here.
    """
    if container == "wav":
        declared, present = riff_data_sizes(handle, size)
        if declared is not None and declared > present + 1:  # +1: the chunk's pad byte
            return f"WAV header declares {declared} data bytes, {present} present"
        return None
    if container == "ogg":
        return ogg_cut(handle, size)
    return None


def decoded_cut(handle: BinaryIO, *, container: str | None, n_decoded: int) -> str | None:
    """Why a file that decoded to ``n_decoded`` frames is cut short by its container's declared length, or None.

    FLAC is sample-exact, so a single frame short of STREAMINFO's total is a cut;
    a total of 0 (unknown) or another container gives None.
    """
    if container != "flac":
        return None
    total = flac_total_frames(handle)
    if total is not None and n_decoded < total:
        return f"FLAC STREAMINFO declares {total} frames, {n_decoded} decoded"
    return None


def riff_data_sizes(handle: BinaryIO, size: int) -> tuple[int | None, int]:
    """``(declared, present)`` byte sizes of a WAV file's ``data`` chunk; declared is None if not found."""
    handle.seek(0)
    header = handle.read(12)
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        return None, 0
    offset = 12
    while offset + 8 <= size:
        handle.seek(offset)
        chunk = handle.read(8)
        chunk_id, chunk_size = chunk[:4], int.from_bytes(chunk[4:8], "little")
        if chunk_id == b"data":
            # 0xFFFFFFFF marks a streamed WAV whose length was never written: not a truncation.
            declared = None if chunk_size in (0, 0xFFFFFFFF) else chunk_size
            return declared, size - offset - 8
        offset += 8 + chunk_size + (chunk_size & 1)
    return None, 0


def ogg_cut(handle: BinaryIO, size: int) -> str | None:
    """Why an Ogg file of ``size`` bytes is cut short, or None when every logical stream in it is complete.

    Walks the page headers (capture pattern, version, header_type, serial number,
    segment table) and skips the packets. A file cut anywhere either ends inside a
    page (the header or the segment table promise more bytes than remain) or ends
    on a page boundary before the page flagged end-of-stream. Every logical stream
    must be closed, so a chained file (one stream after another) or one with
    several streams side by side is checked stream by stream. Granule positions are
    not compared: neither the Vorbis nor the Opus headers declare a length to
    compare them with (and Opus counts them at 48 kHz from before its pre-skip).
    Bytes that are not a page (junk between pages, a tag after the last one) are
    skipped to the next capture pattern.
    """
    closed: dict[int, bool] = {}  # serial number -> end-of-stream page seen
    offset = 0
    while offset < size:
        handle.seek(offset)
        header = handle.read(OGG_HEADER_BYTES)
        # A page starts with the capture pattern and version 0 (a cut may leave only part of them).
        starts_a_page = OGG_CAPTURE.startswith(header[:4]) and (len(header) < 5 or header[4] == 0)
        if not starts_a_page:  # junk between pages or after the last: look for the next one
            offset = _next_capture(handle, offset + 1, size)
            if offset is None:
                break
            continue
        if len(header) < OGG_HEADER_BYTES:
            return f"the Ogg page at byte {offset} is cut inside its header ({len(header)} of {OGG_HEADER_BYTES} bytes)"
        n_segments = header[26]
        segments = handle.read(n_segments)
        page_bytes = OGG_HEADER_BYTES + n_segments + sum(segments)
        if len(segments) < n_segments or offset + page_bytes > size:
            return f"the Ogg page at byte {offset} holds {size - offset} of its {page_bytes} bytes"
        serial, flags = int.from_bytes(header[14:18], "little"), header[5]
        if flags & OGG_BEGIN_OF_STREAM or serial not in closed:  # a chain may reuse a serial number
            closed[serial] = False
        if flags & OGG_END_OF_STREAM:
            closed[serial] = True
        offset += page_bytes
    open_streams = [serial for serial, ended in closed.items() if not ended]
    if open_streams:
        return f"the Ogg stream (serial {open_streams[0]}) stops without its end-of-stream page, {size} bytes in"
    return None


def flac_total_frames(handle: BinaryIO) -> int | None:
    """Frames (samples per channel) FLAC's STREAMINFO declares; None when unknown.

    The format lets an encoder that could not seek back write 0 (unknown), so 0 gives
    None, as does a file without a readable STREAMINFO block.
    """
    marker = _flac_marker(handle)
    if marker is None:
        return None
    handle.seek(marker + 4)
    block = handle.read(4 + 34)  # metadata block header, then STREAMINFO's 34 bytes
    if len(block) < 38 or block[0] & 0x7F != 0:  # STREAMINFO (type 0) must come first
        return None
    # Bytes 10-17: sample rate (20 bits), channels - 1 (3), bits - 1 (5), total samples (36).
    total = int.from_bytes(block[4 + 10 : 4 + 18], "big") & ((1 << 36) - 1)
    return total or None


def _flac_marker(handle: BinaryIO) -> int | None:
    """Offset of the ``fLaC`` marker: 0, or just past an ID3v2 tag that some taggers put first."""
    handle.seek(0)
    head = handle.read(10)
    offset = 0
    if head[:3] == b"ID3" and len(head) == 10:
        # The tag size is "syncsafe": four bytes of 7 bits each.
        tag_bytes = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | (head[9] & 0x7F)
        offset = 10 + tag_bytes + (10 if head[5] & 0x10 else 0)  # flag 0x10: a footer follows the tag
        handle.seek(offset)
        head = handle.read(4)
    return offset if head[:4] == b"fLaC" else None


def _next_capture(handle: BinaryIO, start: int, size: int) -> int | None:
    """Offset of the next Ogg capture pattern at or after ``start``, or None."""
    position, carry = start, b""
    handle.seek(start)
    while position < size:
        chunk = handle.read(_SEARCH_CHUNK)
        if not chunk:
            break
        found = (carry + chunk).find(OGG_CAPTURE)
        if found >= 0:
            return position - len(carry) + found
        carry = (carry + chunk)[-(len(OGG_CAPTURE) - 1) :]
        position += len(chunk)
    return None
