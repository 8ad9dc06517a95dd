from service.stop_strings import StopStringMatcher


def feed_all(stops, pieces):
    matcher = StopStringMatcher(stops)
    out = []
    for piece in pieces:
        out.append(matcher.feed(piece))
        if matcher.matched is not None:
            return "".join(out), matcher.matched
    out.append(matcher.flush())
    return "".join(out), None


def test_no_stops_passes_text_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("hello") == "hello"


def test_stop_inside_one_piece_cuts_before_it():
    assert feed_all(["END"], ["abcENDxyz"]) == ("abc", "END")


def test_stop_split_over_pieces_is_held_back_then_removed():
    matcher = StopStringMatcher(["</s>"])
    assert matcher.feed("text <") == "text "
    assert matcher.feed("/") == ""
    assert matcher.feed("s>tail") == ""
    assert matcher.matched == "</s>"


def test_held_text_is_released_when_it_cannot_match():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("ST") == ""
    assert matcher.feed("ar") == "STar"
    assert matcher.matched is None


def test_flush_returns_held_text_at_the_end():
    assert feed_all(["STOP"], ["a", "ST"]) == ("aST", None)


def test_earliest_of_several_stops_wins():
    assert feed_all(["b", "a"], ["xxab"]) == ("xx", "a")


def test_every_split_of_the_text_gives_the_same_result():
    text = "The answer is 42.\nQuestion: next"
    for cut in range(1, len(text)):
        assert feed_all(["\nQuestion:"], [text[:cut], text[cut:]]) == ("The answer is 42.", "\nQuestion:")
