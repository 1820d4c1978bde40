"""report.md's lines on the pick scaled to the budget's aim (`pipeline.run.fill`): apart from
it, so that the report's rendering imports none of the stages."""

from __future__ import annotations

from typing import Any


def fill_markdown(fill: dict[str, Any] | None) -> list[str]:
    """report.md's lines on the scaling: the ladder as measured, and what shipped."""
    if not fill or not fill.get("ladder"):
        return []
    rungs = ", ".join(
        f"{r['name']} {r['ms']:.3f} ms{'' if r['within'] else ' (over)'}" for r in fill["ladder"]
    )
    shipped = f"the pick scaled x{fill['scale']:.2f}" if fill["scale"] else "the pick as found"
    anchor = fill.get("anchor", "pick")
    reading = f"{fill.get('pick_session_ms', fill['pick_ms']):.3f} ms"
    if anchor == "original":
        reading += ", each read against the original on its scale at the search's start"
    return [
        f"- Scaled along its own shape towards {fill['target_ms']:.3f} ms (the pick {reading}; "
        f"untrained, measured beside it): {rungs}. Shipped: {shipped}"
    ]
