"""Canvas pagination: `page`/`per_page`, absolute `Link` URLs and JSON-API `meta.pagination`.

Canvas builds link URLs from the request's own scheme and host and, like any Rails app,
believes `X-Forwarded-Host` and `X-Forwarded-Proto` when they are present. The simulator does
the same so tests can show that a proxy in front of it does not pass those headers on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

if TYPE_CHECKING:
    from starlette.datastructures import Headers

DEFAULT_PER_PAGE = 10
MAX_PER_PAGE = 100

# Canvas leaves these out of pagination links (Api::EXCLUDE_IN_PAGINATION_LINKS) and sets
# page/per_page itself.
_EXCLUDED_FROM_LINKS = frozenset({"page", "per_page", "access_token", "api_key"})


def _last_forwarded(headers: Headers, name: str) -> str | None:
    # Rails takes the last entry of a comma-separated X-Forwarded-* list.
    value = headers.get(name)
    if not value:
        return None
    return value.split(",")[-1].strip() or None


def request_base_url(scheme: str, headers: Headers, server: tuple[str, int] | None) -> str:
    """`scheme://host[:port]` of a request as Rails sees it, honouring `X-Forwarded-*`."""
    proto = _last_forwarded(headers, "x-forwarded-proto") or scheme
    host = _last_forwarded(headers, "x-forwarded-host") or headers.get("host")
    if not host:
        host = f"{server[0]}:{server[1]}" if server else "localhost"
    return f"{proto}://{host}"


def _positive_int(value: object, default: int) -> int:
    if isinstance(value, str) and value.isdigit() and int(value) > 0:
        return int(value)
    return default


@dataclass(frozen=True)
class Page:
    """One page of a collection."""

    items: list[Any]
    page: int
    per_page: int
    count: int

    @property
    def last_page(self) -> int:
        """The number of the last page; an empty collection still has page 1."""
        return max(1, math.ceil(self.count / self.per_page))


def paginate(items: list[Any], params: dict[str, Any], max_per_page: int = MAX_PER_PAGE) -> Page:
    """Cut the page that `page` and `per_page` ask for (defaults 1 and 10).

    `per_page` is capped at `max_per_page`, which Canvas sets per instance (default 100).
    """
    page = _positive_int(params.get("page"), 1)
    per_page = min(_positive_int(params.get("per_page"), DEFAULT_PER_PAGE), max_per_page)
    start = (page - 1) * per_page
    return Page(items[start : start + per_page], page, per_page, len(items))


def page_links(page: Page, base_url: str, raw_path: str, query_string: str) -> dict[str, str]:
    """Map each rel to its absolute URL, in Canvas's order: current, next, prev, first, last."""
    kept = [
        (key, value)
        for key, value in parse_qsl(query_string, keep_blank_values=True)
        if key not in _EXCLUDED_FROM_LINKS
    ]

    def url(number: int) -> str:
        query = urlencode([*kept, ("page", str(number)), ("per_page", str(page.per_page))])
        return f"{base_url}{raw_path}?{query}"

    links = {"current": url(page.page)}
    if page.page < page.last_page:
        links["next"] = url(page.page + 1)
    if page.page > 1:
        links["prev"] = url(page.page - 1)
    links["first"] = url(1)
    links["last"] = url(page.last_page)
    return links


def link_header(links: dict[str, str]) -> str:
    """Format a `Link` header the way Canvas does: entries joined by `,` with no space."""
    return ",".join(f'<{url}>; rel="{rel}"' for rel, url in links.items())


def pagination_meta(page: Page, links: dict[str, str]) -> dict[str, Any]:
    """Build the `meta.pagination` Canvas adds to JSON-API (`application/vnd.api+json`) lists."""
    return {**links, "page": page.page, "per_page": page.per_page, "count": page.count}
