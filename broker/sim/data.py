"""Seeded, in-memory Canvas data for the simulator.

Records are small dataclasses; each knows how to render itself as the JSON Canvas returns for
it, so handlers never assemble Canvas shapes by hand. Everything is deterministic: the same seed
produces the same ids, uuids and dates on every run, so tests can name them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

JSONObject = dict[str, Any]

ACCOUNT_ID = 1
ADMIN_USER_ID = 1
"""The user every simulator token belongs to: an account admin teaching every course."""

_SEED_TIME = "2025-01-06T09:00:00Z"


def _canvas_uuid(kind: str, record_id: int) -> str:
    # Canvas uuids are 40 random alphanumerics; a SHA-1 hex digest has that shape and is stable.
    return hashlib.sha1(f"{kind}-{record_id}".encode(), usedforsecurity=False).hexdigest()


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Account:
    """A Canvas account (the institution's root account)."""

    id: int
    name: str

    def to_json(self) -> JSONObject:
        """Render as Canvas's Account object."""
        return {
            "id": self.id,
            "name": self.name,
            "uuid": _canvas_uuid("account", self.id),
            "parent_account_id": None,
            "root_account_id": None,
            "default_time_zone": "Europe/London",
            "workflow_state": "active",
        }


@dataclass
class User:
    """A Canvas user."""

    id: int
    name: str
    sortable_name: str
    short_name: str
    login_id: str
    sis_user_id: str | None

    def to_json(self) -> JSONObject:
        """Render as Canvas's User object, as returned by `/users/:id` and course rosters."""
        return {
            "id": self.id,
            "name": self.name,
            "created_at": _SEED_TIME,
            "sortable_name": self.sortable_name,
            "short_name": self.short_name,
            "sis_user_id": self.sis_user_id,
            "integration_id": None,
            "login_id": self.login_id,
            "avatar_url": "https://canvas.instructure.com/images/messages/avatar-50.png",
            "locale": None,
        }


@dataclass
class Course:
    """A Canvas course."""

    id: int
    name: str
    course_code: str
    sis_course_id: str | None
    account_id: int
    workflow_state: str
    uuid: str = ""

    def __post_init__(self) -> None:
        if not self.uuid:
            self.uuid = _canvas_uuid("course", self.id)

    def to_json(self, enrollments: list[JSONObject] | None = None) -> JSONObject:
        """Render as Canvas's Course object, with the caller's `enrollments` as `/courses` adds."""
        body: JSONObject = {
            "id": self.id,
            "name": self.name,
            "account_id": self.account_id,
            "uuid": self.uuid,
            "start_at": None,
            "grading_standard_id": None,
            "is_public": False,
            "created_at": _SEED_TIME,
            "course_code": self.course_code,
            "default_view": "modules",
            "root_account_id": ACCOUNT_ID,
            "enrollment_term_id": 1,
            "license": "private",
            "end_at": None,
            "public_syllabus": False,
            "storage_quota_mb": 500,
            "apply_assignment_group_weights": False,
            "time_zone": "Europe/London",
            "blueprint": False,
            "sis_course_id": self.sis_course_id,
            "integration_id": None,
            "workflow_state": self.workflow_state,
            "hide_final_grades": False,
            "restrict_enrollments_to_course_dates": False,
        }
        if enrollments is not None:
            body["enrollments"] = enrollments
        return body


@dataclass
class Enrollment:
    """A user's enrolment in a course; `type` is Canvas's class name, e.g. `StudentEnrollment`."""

    id: int
    course_id: int
    user_id: int
    type: str

    @property
    def short_type(self) -> str:
        """The lower-case form `/courses` uses (`student`, `teacher`)."""
        return self.type.removesuffix("Enrollment").lower()

    def to_json(self, user: User) -> JSONObject:
        """Render as Canvas's Enrollment object with its embedded user."""
        return {
            "id": self.id,
            "course_id": self.course_id,
            "course_section_id": self.course_id * 10,
            "root_account_id": ACCOUNT_ID,
            "user_id": self.user_id,
            "type": self.type,
            "role": self.type,
            "enrollment_state": "active",
            "created_at": _SEED_TIME,
            "updated_at": _SEED_TIME,
            "limit_privileges_to_course_section": False,
            "html_url": f"/courses/{self.course_id}/users/{self.user_id}",
            "user": {
                key: value
                for key, value in user.to_json().items()
                if key not in {"avatar_url", "locale"}
            },
        }

    def to_course_summary(self) -> JSONObject:
        """Render as the short form embedded in `/courses` results."""
        return {
            "type": self.short_type,
            "role": self.type,
            "user_id": self.user_id,
            "enrollment_state": "active",
            "limit_privileges_to_course_section": False,
        }


@dataclass
class Assignment:
    """A Canvas assignment; deletion only changes `workflow_state`, as in Canvas."""

    id: int
    course_id: int
    name: str
    position: int
    points_possible: float | None = None
    due_at: str | None = None
    description: str | None = None
    submission_types: list[str] = field(default_factory=lambda: ["online_text_entry"])
    published: bool = True
    deleted: bool = False
    created_at: str = _SEED_TIME
    updated_at: str = _SEED_TIME
    created_by_user_id: int | None = None
    """Who created it through the simulator (the effective user, after masquerading)."""

    @property
    def workflow_state(self) -> str:
        """Canvas's lifecycle state: `published`, `unpublished` or `deleted`."""
        if self.deleted:
            return "deleted"
        return "published" if self.published else "unpublished"

    def to_json(self, base_url: str) -> JSONObject:
        """Render as Canvas's Assignment object; `html_url` is built on `base_url`."""
        html_url = f"{base_url}/courses/{self.course_id}/assignments/{self.id}"
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "due_at": self.due_at,
            "lock_at": None,
            "unlock_at": None,
            "course_id": self.course_id,
            "html_url": html_url,
            "submissions_download_url": f"{html_url}/submissions?zip=1",
            "assignment_group_id": self.course_id * 10,
            "points_possible": self.points_possible,
            "grading_type": "points",
            "submission_types": list(self.submission_types),
            "position": self.position,
            "published": self.published,
            "workflow_state": self.workflow_state,
            "has_submitted_submissions": False,
            "sim_created_by_user_id": self.created_by_user_id,
        }


@dataclass
class File:
    """A course file whose bytes live on a separate "file storage" host."""

    id: int
    course_id: int
    display_name: str
    content_type: str
    size: int

    @property
    def uuid(self) -> str:
        """Canvas's 40-character file uuid."""
        return _canvas_uuid("file", self.id)

    def download_url(self, file_host: str) -> str:
        """Return the pre-signed storage URL that `/files/:id/download` redirects to."""
        signature = hashlib.sha256(f"sig-{self.uuid}".encode()).hexdigest()[:32]
        return f"{file_host}/files/{self.id}/download?sig={signature}"

    def to_json(self, file_host: str) -> JSONObject:
        """Render as Canvas's File object, its `url` on the storage host."""
        return {
            "id": self.id,
            "uuid": self.uuid,
            "folder_id": self.course_id * 100,
            "display_name": self.display_name,
            "filename": self.display_name,
            "upload_status": "success",
            "content-type": self.content_type,
            "url": self.download_url(file_host),
            "size": self.size,
            "created_at": _SEED_TIME,
            "updated_at": _SEED_TIME,
            "modified_at": _SEED_TIME,
            "unlock_at": None,
            "lock_at": None,
            "locked": False,
            "hidden": False,
            "hidden_for_user": False,
            "locked_for_user": False,
            "thumbnail_url": None,
            "mime_class": self.content_type.split("/")[-1],
            "media_entry_id": None,
        }


@dataclass
class SimData:
    """All records the simulator serves, keyed by id; mutated by write endpoints."""

    account: Account
    users: dict[int, User]
    courses: dict[int, Course]
    enrollments: list[Enrollment]
    assignments: dict[int, Assignment]
    files: dict[int, File]
    next_assignment_id: int

    def find_user(self, ref: str) -> User | None:
        """Look a user up by numeric id or `sis_user_id:<id>`, as Canvas ids in paths allow."""
        sis_id = ref.removeprefix("sis_user_id:")
        if sis_id != ref:
            return next((u for u in self.users.values() if u.sis_user_id == sis_id), None)
        return self.users.get(int(ref)) if ref.isdigit() else None

    def find_course(self, ref: str) -> Course | None:
        """Look a course up by numeric id, `sis_course_id:<id>` or `uuid:<uuid>`."""
        for prefix, attribute in (("sis_course_id:", "sis_course_id"), ("uuid:", "uuid")):
            if ref.startswith(prefix):
                wanted = ref.removeprefix(prefix)
                return next(
                    (c for c in self.courses.values() if getattr(c, attribute) == wanted), None
                )
        return self.courses.get(int(ref)) if ref.isdigit() else None

    def course_enrollments(self, course_id: int) -> list[Enrollment]:
        """Return the enrolments in a course, in id order."""
        return [e for e in self.enrollments if e.course_id == course_id]

    def user_enrollments(self, user_id: int) -> list[Enrollment]:
        """Return a user's enrolments, in id order."""
        return [e for e in self.enrollments if e.user_id == user_id]

    def course_assignments(self, course_id: int) -> list[Assignment]:
        """Return a course's assignments that are not deleted, in position order."""
        found = [a for a in self.assignments.values() if a.course_id == course_id and not a.deleted]
        return sorted(found, key=lambda a: (a.position, a.id))

    def add_assignment(self, course_id: int, name: str) -> Assignment:
        """Create an assignment at the end of the course's list and return it."""
        assignment_id = self.next_assignment_id
        self.next_assignment_id += 1
        position = len(self.course_assignments(course_id)) + 1
        now = _timestamp(datetime.now(UTC))
        assignment = Assignment(
            id=assignment_id,
            course_id=course_id,
            name=name,
            position=position,
            created_at=now,
            updated_at=now,
        )
        self.assignments[assignment_id] = assignment
        return assignment


_USERS = [
    User(1, "Grace Hopper", "Hopper, Grace", "Grace Hopper", "ghopper", "U-0001"),
    User(2, "Alan Turing", "Turing, Alan", "Alan Turing", "aturing", "U-0002"),
    User(3, "Katherine Johnson", "Johnson, Katherine", "Katherine J.", "kjohnson", "U-0003"),
    User(4, "Edsger Dijkstra", "Dijkstra, Edsger", "Edsger Dijkstra", "edijkstra", "U-0004"),
    User(5, "Barbara Liskov", "Liskov, Barbara", "Barbara Liskov", "bliskov", None),
]

_COURSES = [
    (1201, "Introduction to Computing", "CS101", "available"),
    (1202, "Data Structures", "CS201", "available"),
    (1203, "Algorithms", "CS301", "available"),
    (1204, "Research Methods", "CS900", "unpublished"),
]

_STUDENTS = {1201: [2, 3, 4, 5], 1202: [2, 3], 1203: [4], 1204: []}

_LONG_COURSE = 5
_ASSIGNMENT_COUNTS = {1201: 35, 1202: 3, 1203: 2, 1204: 0}

_FILES = [
    File(9001, 1201, "syllabus.pdf", "application/pdf", 48213),
    File(9002, 1201, "dataset.csv", "text/csv", 1024),
    File(9003, 1202, "lecture-notes.txt", "text/plain", 2048),
]


def _seed_assignments() -> dict[int, Assignment]:
    assignments: dict[int, Assignment] = {}
    first_due = datetime(2025, 1, 13, 23, 59, tzinfo=UTC)
    for course_index, (course_id, count) in enumerate(_ASSIGNMENT_COUNTS.items()):
        for position in range(1, count + 1):
            assignment_id = 5000 + course_index * 100 + position
            assignments[assignment_id] = Assignment(
                id=assignment_id,
                course_id=course_id,
                name=f"Week {position} exercise",
                position=position,
                points_possible=10.0,
                due_at=_timestamp(first_due + timedelta(days=7 * (position - 1))),
                # The last two of a long course are still drafts, as teachers leave them.
                published=count < _LONG_COURSE or position <= count - 2,
            )
    return assignments


def seed_data() -> SimData:
    """Build the simulator's standard data set; a fresh, independent copy on every call."""
    memberships = [
        (
            course_id,
            user_id,
            "TeacherEnrollment" if user_id == ADMIN_USER_ID else "StudentEnrollment",
        )
        for course_id, students in _STUDENTS.items()
        for user_id in [ADMIN_USER_ID, *students]
    ]
    enrollments = [
        Enrollment(7000 + index, course_id, user_id, kind)
        for index, (course_id, user_id, kind) in enumerate(memberships, start=1)
    ]
    return SimData(
        account=Account(ACCOUNT_ID, "Sim University"),
        users={u.id: replace(u) for u in _USERS},
        courses={
            course_id: Course(course_id, name, code, f"SIS-{course_id}", ACCOUNT_ID, state)
            for course_id, name, code, state in _COURSES
        },
        enrollments=enrollments,
        assignments=_seed_assignments(),
        files={f.id: replace(f) for f in _FILES},
        next_assignment_id=6001,
    )
