"""Lua scripts: the registry, their SHA1 and the KEYS/ARGV header (no sockets)."""

from __future__ import annotations

from importlib import resources

from toolkit.tiers.redis import client as client_mod


def test_script_sha_matches_the_registered_scripts() -> None:
    c = client_mod.Client("redis://127.0.0.1:1/0")  # connects to nothing until used
    try:
        assert set(c.scripts) == set(client_mod.SCRIPT_NAMES)
        for name in client_mod.SCRIPT_NAMES:
            assert client_mod.script_sha(name) == c.script(name).sha
    finally:
        c.close()


def test_every_packaged_script_is_registered_and_opens_with_its_keys() -> None:
    pkg = resources.files("toolkit.tiers.redis") / "scripts"
    names = {p.name.removesuffix(".lua") for p in pkg.iterdir() if p.name.endswith(".lua")}
    assert names == set(client_mod.SCRIPT_NAMES)
    for name in names:
        head = client_mod.script_text(name).splitlines()
        assert head[0].startswith("-- ") and any(line.startswith("-- KEYS[") for line in head[:4])
        assert any(line.startswith("-- returns") for line in head)
