"""The xdist test order (tests/fixtures/schedule.py): chunks of xdist's sizes, longest first, balanced."""
from __future__ import annotations

import types

from tests.fixtures.schedule import deal, estimated_seconds


def _items(seconds: dict[str, float], n_short: int):
    names = list(seconds) + [f"short{i}" for i in range(n_short)]
    return [types.SimpleNamespace(nodeid=name) for name in names]


def test_long_tests_are_dealt_to_the_front_of_each_workers_chunk():
    seconds = {"demo": 270.0, "study": 190.0, "wide": 160.0, "resume": 90.0, "grow": 70.0, "ff": 50.0}
    items = _items(seconds, 9)  # 15 tests: xdist gives worker 0 the first 7, worker 1 the other 8
    order = [it.nodeid for it in deal(items, seconds, 2)]
    first, second = order[:7], order[7:]
    assert sorted(order) == sorted(it.nodeid for it in items)  # a permutation
    # by hand: demo→0, study→1, wide→1 (190 < 270), resume→0 (270 < 350), grow→1 (350 < 360), ff→0
    assert first[:3] == ["demo", "resume", "ff"] and second[:3] == ["study", "wide", "grow"]
    load = [sum(seconds.get(n, 0.5) for n in chunk) for chunk in (first, second)]
    assert load == [410 + 4 * 0.5, 420 + 5 * 0.5]
    # three workers: sizes 5, 5, 5, each chunk led by one of the three longest
    three = [it.nodeid for it in deal(items, seconds, 3)]
    assert {three[0], three[5], three[10]} == {"demo", "study", "wide"}


def test_the_recorded_durations_name_real_tests():
    recorded = estimated_seconds()
    assert recorded and all(v > 0 for v in recorded.values())
    assert all("::test_" in k and k.startswith("tests/test_") for k in recorded)
