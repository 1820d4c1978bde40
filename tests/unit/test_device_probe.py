"""What the device agent reports about its machine: probed safely, plain JSON-ready data."""

from __future__ import annotations

import json

from pipeline.device import probe


def test_nvpmodel_output_gives_the_power_mode():
    text = "NVPM WARN: fan mode is not set!\nNV Power Mode: MAXN_SUPER\n2\n"
    assert probe.parse_nvpmodel(text) == {"power_mode": "MAXN_SUPER", "power_mode_id": "2"}
    assert probe.parse_nvpmodel("") == {"power_mode": None, "power_mode_id": None}


def test_health_and_system_info_are_plain_data_here():
    health = probe.health()
    assert health["time"] > 0 and health["mem_available_mb"] > 0
    assert len(health["load_avg"]) == 3
    assert all(isinstance(v, float) for v in health["temperatures_c"].values())
    info = probe.system_info()
    assert info["device"] and info["hostname"] and info["python"] and info["cpu_count"] >= 1
    json.dumps({"health": health, "info": info})  # what the agent sends must serialise


def test_missing_tools_and_files_give_none():
    assert probe.run_tool("no-such-tool-anywhere", "-q") is None
    assert probe.read_text("/no/such/file") is None
