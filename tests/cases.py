"""Hypothesis pieces shared by the tests that check filtered convs against the spec oracle."""

from hypothesis import strategies as st


def draw_channels(draw) -> tuple[int, int, int]:
    """(groups, in channels, out channels): dense, two groups, or depthwise (multiplier 1-2)."""
    groups_kind = draw(st.sampled_from(["1", "2", "depthwise"]))
    if groups_kind == "1":
        return 1, draw(st.integers(1, 3)), draw(st.integers(1, 3))
    if groups_kind == "2":
        return 2, 2 * draw(st.integers(1, 2)), 2 * draw(st.integers(1, 2))
    c = draw(st.integers(1, 4))
    return c, c, c * draw(st.sampled_from([1, 2]))
