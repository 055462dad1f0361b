"""The device list on a large fleet: a count that stops at a lookahead, filters that use indexes.

These run on SQLite and on PostgreSQL (``DATABASE_URL``): the tag filter is written
differently for each (text match, JSON containment on an index's expression) and must
select the same devices.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.urls import reverse

from tests.frontend.conftest import make_devices

pytestmark = pytest.mark.django_db


def _names(client: Any, query: str) -> list[str]:
    response = client.get(reverse("frontend:devices") + "?" + query)
    assert response.status_code == 200
    return [d.name for d in response.context["page_obj"].object_list]


def test_the_count_stops_at_the_lookahead_and_later_pages_stay_reachable(
    page_client: Any, monkeypatch: Any
) -> None:
    from frontend.views import fleet as views

    monkeypatch.setattr(views, "DEVICE_COUNT_LOOKAHEAD", 60)
    make_devices(count=126, prefix="many")
    client = page_client("viewer")

    first = client.get(reverse("frontend:devices"))
    page = first.context["page_obj"]
    assert (page.paginator.count, page.paginator.exact, page.paginator.num_pages) == (60, False, 2)
    assert page.has_next() and len(page.object_list) == 50
    assert "page 1 of 2+ · 60+ devices" in first.content.decode()

    # Page 3 lies past the first count: asking for it counts from its own start.
    third = client.get(reverse("frontend:devices") + "?page=3")
    page = third.context["page_obj"]
    assert (page.number, page.paginator.count, page.paginator.exact) == (3, 126, True)
    assert [d.name for d in page.object_list] == [f"many-{i:05d}" for i in range(100, 126)]
    assert not page.has_next()
    assert "page 3 of 3 · 126 devices" in third.content.decode()

    # Past the end, or not a page number: the last page, or the first.
    assert client.get(reverse("frontend:devices") + "?page=99").context["page_obj"].number == 3
    for junk in ("abc", "0", "-2", "9" * 30):
        assert client.get(reverse("frontend:devices") + f"?page={junk}").context["page_obj"].number == 1


def test_a_count_within_the_lookahead_is_exact(page_client: Any) -> None:
    make_devices(count=70, prefix="few")
    response = page_client("viewer").get(reverse("frontend:devices") + "?page=2")
    page = response.context["page_obj"]
    assert (page.paginator.count, page.paginator.exact, len(page.object_list)) == (70, True, 20)
    assert "page 2 of 2 · 70 devices" in response.content.decode()


def test_tag_filter_matches_whole_tags_in_any_case(page_client: Any) -> None:
    from fleet.models import Device

    a, b, c, d = make_devices(count=4, prefix="tagged")
    Device.objects.filter(pk=a.pk).update(tags=["Camera", "line-1"])
    Device.objects.filter(pk=b.pk).update(tags=["cameras", "line-10"])
    Device.objects.filter(pk=c.pk).update(tags=["dock"])
    Device.objects.filter(pk=d.pk).update(tags=[])
    client = page_client("viewer")

    assert _names(client, "tag=camera") == [a.name]
    assert _names(client, "tag=CAMERA") == [a.name]
    assert _names(client, "tag=line-1") == [a.name]
    assert _names(client, "tag=cameras") == [b.name]
    assert _names(client, "tag=camera&status=offline") == []
    assert _names(client, "tag=came") == []
    # Text that is not a tag matches nothing and is no error.
    for text in ('"', "%", "[]", '["camera"]', "ü", "x" * 300):
        assert _names(client, f"tag={text}") == []


def test_group_filter_lists_static_and_tag_selected_members_once(page_client: Any) -> None:
    from fleet.models import Device, DeviceGroup

    group = DeviceGroup.objects.create(name="docks", tag_selector=["dock", "east"])
    other = DeviceGroup.objects.create(name="other")
    static, both, tagged, half, outside = make_devices(count=5, prefix="member")
    Device.objects.filter(pk=both.pk).update(tags=["Dock", "EAST"])
    Device.objects.filter(pk=tagged.pk).update(tags=["east", "dock", "x"])
    Device.objects.filter(pk=half.pk).update(tags=["dock"])
    static.groups.add(group, other)
    both.groups.add(group)
    outside.groups.add(other)
    client = page_client("viewer")

    assert _names(client, f"group={group.pk}") == [static.name, both.name, tagged.name]
    assert _names(client, "group=docks") == [static.name, both.name, tagged.name]
    assert _names(client, f"group={group.pk}&status=online") == [static.name, both.name]
    response = client.get(reverse("frontend:devices") + f"?group={group.pk}")
    assert response.context["page_obj"].paginator.count == 3
    assert _names(client, "group=nope") == []


def test_the_version_filter_offers_only_versions_devices_run(page_client: Any, fleet: Any) -> None:
    from fleet.models import Device

    Device.objects.filter(running_version=fleet.candidate).update(running_version=fleet.version)
    response = page_client("viewer").get(reverse("frontend:devices"))
    assert [v.pk for v in response.context["choices"]["versions"]] == [fleet.version.pk]


def test_on_postgresql_the_tag_and_name_filters_can_use_their_indexes() -> None:
    """The filters' SQL must stay the indexes' expressions (migration 0016), or PostgreSQL
    reads every device. With sequential scans priced out, the plan shows which index fits."""
    from django.db import connection

    from fleet.selectors.devices import device_list

    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL only: SQLite matches tags and names as text")
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        plans = {}
        for key, value in (("tag", "Camera"), ("search", "board-1")):
            # The paginator's count: the matches alone, unordered.
            query = device_list(filters={key: value}).order_by().values("pk").query
            sql, params = query.sql_with_params()
            cursor.execute("EXPLAIN " + sql, params)
            plans[key] = "\n".join(row[0] for row in cursor.fetchall())
    assert "fleet_device_tags_folded" in plans["tag"]
    assert "fleet_device_name_trgm" in plans["search"]
