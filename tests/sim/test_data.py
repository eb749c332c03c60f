from __future__ import annotations

from broker.sim.data import seed_data


def test_seed_data_returns_independent_copies() -> None:
    first = seed_data()
    second = seed_data()

    first.assignments[5001].deleted = True
    first.users[2].name = "Changed"
    first.files[9001].display_name = "changed.pdf"

    assert not second.assignments[5001].deleted
    assert second.users[2].name == "Alan Turing"
    assert second.files[9001].display_name == "syllabus.pdf"


def test_every_enrollment_has_a_unique_id() -> None:
    ids = [enrollment.id for enrollment in seed_data().enrollments]

    assert len(ids) == len(set(ids))
