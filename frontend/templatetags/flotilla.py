"""Small formatting filters for the dashboard templates."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from django import template
from django.utils import timezone

register = template.Library()


@register.filter
def tojson(value: Any) -> str:
    """JSON for an HTML attribute; autoescaping turns the quotes into entities."""
    return json.dumps(value, separators=(",", ":"), default=str)


@register.filter
def bytesize(value: Any) -> str:
    """1536 -> '1.5 KiB'."""
    if value is None or value == "":
        return "—"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


@register.filter
def pct(value: Any, digits: int = 1) -> str:
    """0.934 -> '93.4%'."""
    if value is None or value == "":
        return "—"
    return f"{float(value) * 100:.{int(digits)}f}%"


@register.filter
def num(value: Any, digits: int = 2) -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{float(value):.{int(digits)}f}"


@register.filter
def metric(value: Any, name: Any = "accuracy") -> str:
    """A primary metric as people read it: accuracy as a percentage, anything else (mae) as is."""
    if value is None or value == "":
        return "—"
    if name in ("accuracy", "", None):
        return pct(value)
    return f"{float(value):.4g}"


@register.filter
def signed(value: Any, name: Any = "accuracy") -> str:
    """A gain with its sign, in the metric's unit: '+1.5%' for accuracy, '+0.032' for mae."""
    if value is None or value == "":
        return "—"
    text = metric(value, name)
    return text if float(value) < 0 else f"+{text}"


@register.filter
def ago(value: datetime | None) -> str:
    """A short age: '12 s ago', '3 min ago', '2 h ago', '4 d ago'."""
    if not value:
        return "never"
    seconds = max(0, int((timezone.now() - value).total_seconds()))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


@register.filter
def get(mapping: Any, key: Any) -> Any:
    if isinstance(mapping, dict):
        return mapping.get(key, mapping.get(str(key)))
    if isinstance(mapping, list | tuple) and isinstance(key, int) and 0 <= key < len(mapping):
        return mapping[key]
    return None


@register.filter
def split_words(value: str) -> list[str]:
    return str(value).split()
