from murderd.lt import staggered_priorities


def test_two_bands_start_at_the_offset():
    assert staggered_priorities(8, 6) == [2, 2, 1, 1, 1, 1, 2, 2]


def test_never_zero_and_always_whole_file():
    for count in (1, 2, 3, 7, 256, 1001):
        for levels in (1, 2, 7, 9):
            out = staggered_priorities(count, count // 3, levels)
            assert len(out) == count
            assert min(out) >= 1 and max(out) == min(max(levels, 1), 7)
