"""services/deliverer/service.py: what a batch whose outcomes were slow to publish writes in the log."""

from __future__ import annotations

from services.deliverer.service import slow_publishes


def test_a_batch_slow_to_publish_is_one_line_not_one_per_job() -> None:
    # Seen after a broker outage: every job of the batch waited for the broker, and each wrote a line.
    took = [12.5, 0.1, 30.2, 14.0, *[13.0] * 96]
    assert slow_publishes(took) == "deliverer: publishing the outcomes of 99 of 100 jobs took 12.5-30.2 s"


def test_a_batch_that_published_in_time_writes_nothing() -> None:
    assert slow_publishes([0.1, 4.9]) is None
    assert slow_publishes([]) is None
