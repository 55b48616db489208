"""The configuration schema: defaults, every error reported with its key path, caller matching."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config import (
    CONFIG_ENV,
    AllowedCaller,
    ConfigError,
    load_config,
    parse_config,
    resolve_config_path,
)

REPO = Path(__file__).resolve().parents[1]


def test_example_config_is_valid():
    cfg = load_config(REPO / "config" / "node.example.yaml")
    assert cfg.node.ae_title == "ACVTT"
    assert cfg.node.port > 1024
    assert cfg.database.url.startswith("sqlite")
    assert [d.name for d in cfg.destinations] == ["pacs"]


def test_defaults():
    cfg = parse_config({})
    assert cfg.node.max_associations == 32  # pynetdicom's 10 turns busy senders away
    assert cfg.node.port == 11112
    assert cfg.storage.fsync is True
    assert cfg.storage.min_free_bytes > 0
    assert cfg.database.url == "sqlite:///var/node.db"
    assert cfg.completion.quiet_seconds == 30


def test_every_error_has_its_key_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "node:\n  port: 70000\n  ae_title: 'WAY TOO LONG AE TITLE'\n  bind_address: nowhere\n"
        "allowed_callers:\n  - {ae_title: X, host: 300.1.1.1}\n  - {host: 10.0.0.0/8}\n"
        "storage: {min_free_bytes: -1}\n"
        "unknown_section: 1\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(bad)
    assert {k for k, _ in exc.value.errors} == {
        "node.ae_title",
        "node.bind_address",
        "node.port",
        "allowed_callers.0.host",
        "allowed_callers.1.ae_title",
        "storage.min_free_bytes",
        "unknown_section",
    }


def test_rule_must_name_known_destination():
    with pytest.raises(ConfigError) as exc:
        parse_config(
            {"rules": [{"name": "r", "action": {"factor": 2, "destinations": ["nowhere"]}}]}
        )
    assert "nowhere" in str(exc.value)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "missing.yaml")
    assert "cannot read" in exc.value.errors[0][1]
    broken = tmp_path / "broken.yaml"
    broken.write_text("node: [unclosed\n")
    with pytest.raises(ConfigError) as exc:
        load_config(broken)
    assert "invalid YAML" in exc.value.errors[0][1]


def test_config_path_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert resolve_config_path(None) == Path("config/node.yaml")
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "env.yaml"))
    assert resolve_config_path(None) == tmp_path / "env.yaml"
    assert resolve_config_path(tmp_path / "cli.yaml") == tmp_path / "cli.yaml"


@pytest.mark.parametrize(
    ("entry", "ae", "ip", "ok"),
    [
        (("PACS", "127.0.0.1"), "PACS", "127.0.0.1", True),
        (("PACS", "127.0.0.1"), "PACS ", "127.0.0.1", True),  # AE titles are space padded
        (("PACS", "127.0.0.1"), "PACS", "127.0.0.2", False),
        (("PACS", "10.1.0.0/16"), "PACS", "10.1.200.3", True),
        (("PACS", "10.1.0.0/16"), "PACS", "10.2.0.1", False),
        (("PACS", "10.1.0.0/16"), "OTHER", "10.1.0.1", False),
        (("PACS", "::1"), "PACS", "::1", True),
        (("PACS", "127.0.0.1"), "PACS", "not-an-ip", False),
    ],
)
def test_allowed_caller_matches(entry, ae, ip, ok):
    assert AllowedCaller(ae_title=entry[0], host=entry[1]).matches(ae, ip) is ok


@pytest.mark.parametrize(
    ("match", "key", "text"),
    [
        ({"spacing_mm": [10, 1.5]}, "rules.0.match.spacing_mm", "greater than max"),
        ({"thickness_mm": [-1, 5]}, "rules.0.match.thickness_mm", "negative"),
        ({"series_description_regex": "[ax"}, "rules.0.match.series_description_regex", "regular"),
    ],
)
def test_rule_match_values_are_checked(match, key, text):
    with pytest.raises(ConfigError) as exc:
        parse_config({"rules": [{"name": "r", "match": match, "action": {"factor": 2}}]})
    assert [(k, text in m) for k, m in exc.value.errors] == [(key, True)]


def test_duplicate_callers_and_database_url():
    with pytest.raises(ConfigError) as exc:
        parse_config(
            {
                "allowed_callers": [
                    {"ae_title": "A", "host": "10.0.0.0/8"},
                    {"ae_title": "A", "host": "10.0.0.1/8"},  # the same network
                ],
                "database": {"url": "not a url"},
            }
        )
    errors = dict(exc.value.errors)
    assert "entries 0 and 1" in errors["allowed_callers"]
    assert "cannot parse" in errors["database.url"]
    # Another caller on the same host, or the same caller on another host, is no duplicate.
    parse_config(
        {
            "allowed_callers": [
                {"ae_title": "A", "host": "10.0.0.1"},
                {"ae_title": "B", "host": "10.0.0.1"},
                {"ae_title": "A", "host": "10.0.0.2"},
            ]
        }
    )


def test_empty_file_is_an_error(tmp_path):
    for text in ("", "# comments only\n", "{}\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        with pytest.raises(ConfigError) as exc:
            load_config(empty)
        assert exc.value.errors == [
            ("", "the file has no settings: start from config/node.example.yaml")
        ]
