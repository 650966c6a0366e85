"""The parsed documents kept in a git directory: bounded, and damage only ever costs a parse."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from keystone.sources.documents import FILE_NAME, MAX_ENTRIES, DocumentFile
from keystone.tomlsrc import Parsed, Reader


def _doc(i: int) -> tuple[str, str, Parsed]:
    """A recipe-like document: its content id (git's blob id of the text), text, parse."""
    text = f'[metadata]\nname = "c{i}"\nversion = "1.0.{i}"\n[lifecycle.run.exec]\ncommand = "x"\n'
    data = text.encode()
    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return f"git:{blob}", text, Reader.from_text(text, file="r").parsed()


def _saved(git_dir: Path, n: int, **bounds: int) -> list[tuple[str, str, Parsed]]:
    docs = DocumentFile.load(git_dir, **bounds)
    made = [_doc(i) for i in range(n)]
    for cid, text, parsed in made:
        docs.put(cid, text, parsed)
    docs.save()
    return made


def _leftovers(git_dir: Path) -> list[str]:
    return sorted(p.name for p in git_dir.iterdir() if p.name != FILE_NAME)


class TestDocumentFile:
    def test_kept_across_loads(self, tmp_path: Path) -> None:
        """What one process put is what the next gets: the text and the parse, line map too."""
        made = _saved(tmp_path, 3)
        docs = DocumentFile.load(tmp_path)
        assert len(docs) == 3
        for cid, text, parsed in made:
            assert docs.get(cid) == (text, parsed)
        assert docs.get("git:" + "0" * 40) is None
        assert _leftovers(tmp_path) == []  # the temporary file was renamed, none is left

    def test_written_only_when_changed(self, tmp_path: Path) -> None:
        """A run that only reads does not write the file again."""
        made = _saved(tmp_path, 2)
        os.utime(tmp_path / FILE_NAME, ns=(10**9, 10**9))
        docs = DocumentFile.load(tmp_path)
        assert docs.get(made[0][0]) is not None
        docs.save()
        assert (tmp_path / FILE_NAME).stat().st_mtime_ns == 10**9

    def test_a_damaged_entry_is_ignored_and_dropped(self, tmp_path: Path) -> None:
        """A flipped byte in one entry loses that entry only; the next save leaves it out."""
        made = _saved(tmp_path, 3)
        path = tmp_path / FILE_NAME
        raw = bytearray(path.read_bytes())
        at = raw.index(b'"c1"')  # inside the second entry's payload
        raw[at + 1] ^= 0x01
        path.write_bytes(bytes(raw))
        docs = DocumentFile.load(tmp_path)
        assert docs.get(made[1][0]) is None
        assert docs.get(made[0][0]) == made[0][1:] and docs.get(made[2][0]) == made[2][1:]
        docs.save()
        assert len(DocumentFile.load(tmp_path)) == 2
        assert _leftovers(tmp_path) == []

    @pytest.mark.parametrize("cut", [1, 20, 70])
    def test_a_truncated_file_keeps_what_is_whole(self, tmp_path: Path, cut: int) -> None:
        """A file cut short (a power cut while another tool copied it) keeps its whole entries."""
        made = _saved(tmp_path, 3)
        path = tmp_path / FILE_NAME
        path.write_bytes(path.read_bytes()[:-cut])
        docs = DocumentFile.load(tmp_path)
        assert [docs.get(cid) is not None for cid, _, _ in made] == [True, True, False]

    @pytest.mark.parametrize(
        "content", [b"", b"garbage", b"keystone-documents 0\n" + b"\0" * 100, b"\xff" * 4096]
    )
    def test_another_format_is_ignored(self, tmp_path: Path, content: bytes) -> None:
        """Anything that is not this format reads as an empty cache, and is replaced."""
        (tmp_path / FILE_NAME).write_bytes(content)
        docs = DocumentFile.load(tmp_path)
        assert len(docs) == 0
        cid, text, parsed = _doc(0)
        docs.put(cid, text, parsed)
        docs.save()
        assert DocumentFile.load(tmp_path).get(cid) == (text, parsed)

    def test_content_that_is_not_its_id_is_never_used(self, tmp_path: Path) -> None:
        """An entry whose text does not hash to its blob id (whatever wrote it) is not used."""
        cid, _, _ = _doc(0)
        _, other_text, other_parsed = _doc(1)
        docs = DocumentFile.load(tmp_path)
        docs.put(cid, other_text, other_parsed)
        docs.save()
        again = DocumentFile.load(tmp_path)
        assert again.get(cid) is None
        again.save()
        assert len(DocumentFile.load(tmp_path)) == 0

    def test_at_its_entry_bound(self, tmp_path: Path) -> None:
        """At MAX_ENTRIES, one more evicts the least recently used; a used one stays."""
        made = _saved(tmp_path, MAX_ENTRIES)
        assert (tmp_path / FILE_NAME).stat().st_size < 16 << 20
        docs = DocumentFile.load(tmp_path)
        assert len(docs) == MAX_ENTRIES
        assert docs.get(made[0][0]) is not None  # used: now the most recent
        cid, text, parsed = _doc(MAX_ENTRIES)
        docs.put(cid, text, parsed)
        docs.save()
        after = DocumentFile.load(tmp_path)
        assert len(after) == MAX_ENTRIES
        assert after.get(made[1][0]) is None  # the least recently used went
        assert after.get(made[0][0]) is not None and after.get(cid) is not None

    def test_at_its_byte_bound(self, tmp_path: Path) -> None:
        """The bytes bound holds too: the oldest entries go until the file fits."""
        made = _saved(tmp_path, 10, max_bytes=1500)
        size = (tmp_path / FILE_NAME).stat().st_size
        docs = DocumentFile.load(tmp_path, max_bytes=1500)
        kept = [cid for cid, _, _ in made if docs.get(cid) is not None]
        assert 0 < len(kept) < 10 and kept == [cid for cid, _, _ in made[-len(kept) :]]
        assert size <= 1500 + 100  # the entries, and the one header line

    def test_a_file_over_the_bound_is_not_read(self, tmp_path: Path) -> None:
        """A file larger than the bound (written with another bound) is ignored, not read."""
        _saved(tmp_path, 10)
        assert len(DocumentFile.load(tmp_path, max_bytes=200)) == 0

    def test_an_unwritable_place_costs_only_the_parse(self, tmp_path: Path) -> None:
        """Without a directory to write in, load is empty and save says nothing."""
        docs = DocumentFile.load(tmp_path / "absent")
        cid, text, parsed = _doc(0)
        docs.put(cid, text, parsed)
        docs.save()
        assert not (tmp_path / "absent").exists()

    def test_only_git_blob_ids_are_kept(self, tmp_path: Path) -> None:
        """A content id that is not a git blob id is not kept."""
        _, text, parsed = _doc(0)
        docs = DocumentFile.load(tmp_path)
        docs.put("text:abc", text, parsed)
        docs.put("git:abc", text, parsed)
        assert len(docs) == 0

    def test_a_date_is_parsed_every_time(self, tmp_path: Path) -> None:
        """A document with a TOML date (which the file's format cannot hold) is not kept."""
        text = "when = 2020-01-01\n"
        docs = DocumentFile.load(tmp_path)
        docs.put("git:" + "1" * 40, text, Reader.from_text(text, file="r").parsed())
        assert len(docs) == 0
