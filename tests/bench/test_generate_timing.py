"""The generate benches' prefill / decode split: paired rounds, never a meaningless rate."""

import itertools

import pytest

from ringfuse.bench import generate


def _clock(monkeypatch, walls):
    """time.perf_counter for median_wall: each timed call lasts the next of ``walls``."""
    now, steps, reads = [0.0], itertools.cycle(walls), itertools.count()

    def perf_counter():  # read twice per call: its start, then its stop one wall later
        if next(reads) % 2:
            now[0] += next(steps)
        return now[0]

    monkeypatch.setattr(generate.time, "perf_counter", perf_counter)


def test_decode_is_the_median_of_paired_differences(monkeypatch):
    # rounds of (1-token, n-token) walls, the last one slow throughout
    _clock(monkeypatch, [1.0, 3.0, 1.1, 3.1, 5.0, 9.0])
    prefill, decode = generate.prefill_and_decode_walls(lambda: None, lambda: None, 3)
    assert prefill == pytest.approx(1.1) and decode == pytest.approx(2.0)


def test_noise_bigger_than_the_decode_doubles_the_rounds(monkeypatch):
    # first 3 rounds: the n-token run measures faster than the 1-token one twice
    _clock(monkeypatch, [1.0, 0.9, 1.0, 0.8, 1.0, 1.2] + [1.0, 1.1] * 6)
    calls = []
    prefill, decode = generate.prefill_and_decode_walls(lambda: calls.append(1), lambda: calls.append(2), 3)
    assert decode > 0 and len(calls) == 2 * (3 + 6)


def test_a_decode_that_never_shows_is_an_error(monkeypatch):
    _clock(monkeypatch, [1.0, 1.0])
    with pytest.raises(RuntimeError, match="no measurable time in 24 rounds"):
        generate.prefill_and_decode_walls(lambda: None, lambda: None, 3)
