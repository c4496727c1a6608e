"""The token codec: big_vision's loc convention, suffix round trips, and a parser that never raises."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from paliseg import tokens
from paliseg.tokens import SegObject


def test_loc_tokens_follow_big_vision_yx_order_and_1023_scale():
    # A 640x480 image (width 640, height 480); box x1=64, y1=48, x2=640, y2=240.
    locs = tokens.box_to_locs((64, 48, 640, 240), width=640, height=480)
    # (y1, x1, y2, x2); 0.5 * 1023 = 511.5 rounds half to even, as tf.round and numpy do.
    assert locs == (102, 102, 512, 1023)
    assert tokens.locs_to_box((0, 0, 1023, 1023), width=640, height=480) == (0.0, 0.0, 640.0, 480.0)


def test_loc_quantisation_clips_outside_the_image():
    assert tokens.box_to_locs((-5, -1, 700, 900), width=640, height=480) == (0, 0, 1023, 1023)


def test_pixel_box_truncates_like_the_big_vision_evaluator():
    # 511/1023*100 = 49.95 -> 49 (truncation, not rounding).
    assert tokens.locs_to_pixel_box((511, 511, 1023, 1023), width=100, height=100) == (49, 49, 100, 100)


def test_suffix_format_matches_the_documented_layout():
    obj = SegObject((1, 2, 300, 400), tuple(range(16)), "crack")
    text = tokens.format_suffix([obj, SegObject((5, 6, 7, 8), tuple([127] * 16), "taping area")])
    assert text.startswith("<loc0001><loc0002><loc0300><loc0400><seg000><seg001>")
    assert "<seg015> crack ; <loc0005>" in text
    assert text.endswith("<seg127> taping area")


def test_sort_objects_is_top_to_bottom_then_left_to_right():
    a = SegObject((10, 50, 20, 60), None, "x")
    b = SegObject((10, 5, 20, 60), None, "x")
    c = SegObject((2, 900, 20, 950), None, "x")
    assert tokens.sort_objects([a, b, c]) == [c, b, a]


def test_parser_counts_each_kind_of_invalid_object():
    good = SegObject((1, 2, 300, 400), tuple(range(16)), "crack").to_text()
    bad_count = "<loc0001><loc0002><loc0300>" + "<seg001>" * 16 + " crack"
    bad_segs = "<loc0001><loc0002><loc0300><loc0400>" + "<seg001>" * 15 + " crack"
    flipped = "<loc0300><loc0002><loc0001><loc0400>" + "<seg001>" * 16 + " crack"
    out_of_range = "<loc0001><loc0002><loc0300><loc0400>" + "<seg200>" * 16
    garbage = "hello <loc0001> world"
    result = tokens.parse_suffix(" ; ".join([good, bad_count, bad_segs, flipped, out_of_range, garbage, good]))
    assert [o.to_text() for o in result.objects] == [good, good]
    assert result.invalid == {"loc_count": 1, "seg_count": 1, "degenerate_box": 1, "token_range": 1, "malformed": 1}
    assert result.invalid_count == 5
    assert result.chunks == [0, 6]  # where each object sits in text.split(";"): confidences are matched by it


def test_empty_suffix_is_zero_objects_and_zero_invalid():
    for text in ["", "   "]:
        result = tokens.parse_suffix(text)
        assert result.objects == [] and result.invalid_count == 0


def test_box_only_objects_are_accepted_when_seg_is_not_required():
    text = "<loc0001><loc0002><loc0300><loc0400> drywall"
    assert tokens.parse_suffix(text).invalid == {"seg_count": 1}
    (obj,) = tokens.parse_suffix(text, require_seg=False).objects
    assert obj.seg is None and obj.label == "drywall"


_labels = st.text(alphabet=st.characters(blacklist_characters="<>;", blacklist_categories=("Cs",)), max_size=12).map(
    str.strip
)


@st.composite
def seg_objects(draw):
    y1, y2 = sorted(draw(st.lists(st.integers(0, 1023), min_size=2, max_size=2, unique=True)))
    x1, x2 = sorted(draw(st.lists(st.integers(0, 1023), min_size=2, max_size=2, unique=True)))
    seg = tuple(draw(st.lists(st.integers(0, 127), min_size=16, max_size=16)))
    return SegObject((y1, x1, y2, x2), seg, draw(_labels))


@settings(max_examples=300, deadline=None)
@given(st.lists(seg_objects(), max_size=5))
def test_format_then_parse_round_trips(objects):
    result = tokens.parse_suffix(tokens.format_suffix(objects))
    assert result.objects == objects
    assert result.invalid_count == 0


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4000), st.integers(1, 4000), st.data())
def test_box_round_trip_is_within_one_quantisation_step(width, height, data):
    x1, x2 = sorted(data.draw(st.lists(st.floats(0, width), min_size=2, max_size=2)))
    y1, y2 = sorted(data.draw(st.lists(st.floats(0, height), min_size=2, max_size=2)))
    decoded = tokens.locs_to_box(tokens.box_to_locs((x1, y1, x2, y2), width, height), width, height)
    steps = (width / 1023, height / 1023, width / 1023, height / 1023)
    for got, want, step in zip(decoded, (x1, y1, x2, y2), steps):
        assert abs(got - want) <= step / 2 + 1e-6


_token_soup = st.lists(
    st.one_of(
        st.sampled_from(
            [
                "<loc0001>",
                "<loc1023>",
                "<loc9999>",
                "<seg000>",
                "<seg127>",
                "<seg999>",
                " ; ",
                ";",
                " ",
                "<",
                ">",
                "crack",
            ]
        ),
        st.text(max_size=5),
    ),
    max_size=40,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), _token_soup))
def test_parser_never_raises_on_any_string(text):
    result = tokens.parse_suffix(text)
    for obj in result.objects:  # everything returned is a valid object that formats and re-parses
        assert tokens.parse_suffix(obj.to_text()).objects == [obj]
