from service.detokenizer import IncrementalDetokenizer

# A toy vocabulary (a test double for the model's token table): "é" (2 bytes) and "🙂" (4 bytes)
# split over byte tokens as byte-fallback vocabularies do.
PIECES = {0: b"caf", 1: b"\xc3", 2: b"\xa9", 3: b" ", 4: b"\xf0\x9f", 5: b"\x99", 6: b"\x82", 7: b"\xff"}


def test_multibyte_character_is_emitted_only_when_complete():
    detok = IncrementalDetokenizer(PIECES.__getitem__)
    assert [detok.add(t) for t in (0, 1, 2, 3, 4, 5, 6)] == ["caf", "", "é", " ", "", "", "🙂"]


def test_unfinished_character_is_flushed_as_replacement():
    detok = IncrementalDetokenizer(PIECES.__getitem__)
    assert detok.add(0) + detok.add(4) == "caf"
    assert detok.flush() == "\ufffd"


def test_invalid_byte_becomes_replacement_character():
    detok = IncrementalDetokenizer(PIECES.__getitem__)
    assert detok.add(7) == "\ufffd"
