"""Stop strings never reach the output, even split across streamed pieces."""
import pytest

from zephyr.stopping import StopStringFilter


def run(pieces, stops):
    f = StopStringFilter(stops)
    shown = [f.push(p) for p in pieces]
    if not f.stopped:
        shown.append(f.flush())
    return shown, f.stopped


def test_stop_string_split_across_pieces_is_never_shown():
    shown, stopped = run(["Hello", " wor", "ld<", "/s", ">after"], ["</s>"])
    assert "".join(shown) == "Hello world" and stopped
    assert all("<" not in s for s in shown)


def test_held_text_is_released_when_it_is_not_a_stop():
    shown, stopped = run(["a<", "b"], ["</s>"])
    assert shown == ["a", "<b", ""] and not stopped


def test_earliest_of_several_stops_wins():
    shown, _ = run(["xx STOP yy END"], ["END", "STOP"])
    assert "".join(shown) == "xx "


@pytest.mark.parametrize("stops", [None, [], [""]])
def test_no_stops_passes_everything(stops):
    shown, stopped = run(["a", "b"], stops)
    assert shown == ["a", "b", ""] and not stopped


def test_end_of_stream_releases_a_partial_match():
    shown, stopped = run(["answer\n\nUs"], ["\n\nUser:"])
    assert "".join(shown) == "answer\n\nUs" and not stopped
