"""Where an adapted module sits in a transformer, read from its name: one rule for the hypernetwork's ids and the
rank reports.

A name's first integer component is its layer; what follows is its module type
(``bert.encoder.layer.3.attention.self.query`` is layer 3, type ``attention.self.query``, leaf ``query``).
A name without an integer component (``bert.pooler.dense``) has no layer, and the whole name is its type.
"""
from __future__ import annotations

import re
from typing import NamedTuple

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


class ModulePosition(NamedTuple):
    """The layer index (``None`` outside the numbered layers) and the module type of one module name."""

    layer: int | None
    kind: str

    @property
    def leaf(self) -> str:
        """The last component of the type (``attention.self.query`` -> ``query``)."""
        return self.kind.rsplit(".", 1)[-1]


def module_position(name: str) -> ModulePosition:
    """:class:`ModulePosition` of a module name (see the module docstring for the rule)."""
    match = _LAYER.search(name)
    if match is None:
        return ModulePosition(None, name)
    kind = name[match.end():] or name[: match.start()].rsplit(".", 1)[-1]
    return ModulePosition(int(match.group(1)), kind)
