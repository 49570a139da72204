"""How often progress is shown (``modelyard.progress.Every``)."""

from modelyard.progress import Every


def test_progress_is_shown_first_then_once_per_interval_and_always_at_the_end():
    now = [100.0]
    due = Every(1.0, clock=lambda: now[0])
    shown = []
    for t, final in [(100.0, False), (100.3, False), (100.9, False), (101.0, False), (101.5, False),
                     (102.2, False), (102.4, True)]:
        now[0] = t
        shown.append(due(final=final))
    assert shown == [True, False, False, True, False, True, True]


def test_a_run_of_many_quick_shards_shows_a_handful_of_updates_and_the_last():
    due = Every(1.0)  # the real clock: 50 shards finishing within a few milliseconds
    shown = [done for done in range(1, 51) if due(final=done == 50)]
    assert shown == [1, 50]
