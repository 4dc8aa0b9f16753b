"""Model configs are frozen dataclasses; this holds their JSON round trip."""
from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def config_from_dict(cls: type[T], data: dict[str, Any], where: str) -> T:
    """Builds `cls` from a dict, rejecting unknown keys by name (typos must not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown config keys {unknown}")
    return cls(**data)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
