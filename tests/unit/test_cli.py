"""The CLI and settings: precedence, validation, one-line errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from portcullis import cli, settings


def test_flags_override_environment_which_overrides_the_file(tmp_path: Path) -> None:
    config = tmp_path / "portcullis.yaml"
    config.write_text("kafka:\n  bootstrap: file:1\ntopic_prefix: fromfile.\npartitions: 3\n")
    env = {"PORTCULLIS_BOOTSTRAP": "env:2", "PORTCULLIS_PARTITIONS": "5"}
    args = argparse.Namespace(config=str(config), bootstrap="flag:3", partitions=None)
    conf = settings.load(args, env)
    assert conf.kafka.bootstrap == "flag:3"
    assert conf.partitions == 5
    assert conf.topic_prefix == "fromfile."


def test_a_bad_value_names_where_it_came_from() -> None:
    with pytest.raises(settings.SettingsError, match=r"PORTCULLIS_PARTITIONS.*integer"):
        settings.load(None, {"PORTCULLIS_PARTITIONS": "many"})


def test_unknown_setting_in_file_is_rejected(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("bootstrapp: x\n")
    with pytest.raises(settings.SettingsError, match="unknown setting 'bootstrapp'"):
        settings.load(None, {"PORTCULLIS_CONFIG": str(config)})


def test_sasl_settings_reach_aiokafka_arguments() -> None:
    kafka = settings.KafkaSettings(
        bootstrap="b:9093", security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-256", sasl_username="u", sasl_password="p",
    )
    kwargs = kafka.aiokafka_kwargs()
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-256"
    assert kwargs["sasl_plain_username"] == "u"
    assert kwargs["security_protocol"] == "SASL_PLAINTEXT"


def test_wrong_flag_is_a_usage_error_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["topics", "--no-such-flag"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_every_subcommand_has_help() -> None:
    parser = cli.build_parser()
    names = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert {"broker", "topics", "process", "enforce", "watch", "apply", "demo", "bench"} <= names


@pytest.mark.parametrize(("flag", "message"), [
    ("--fetch-min-bytes=0", "--fetch-min-bytes must be at least 1, got 0"),
    ("--fetch-max-wait=11", "--fetch-max-wait must be between 0 and 10 seconds"),
])
def test_enforce_rejects_fetch_settings_before_it_starts(
    flag: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["enforce", "--node", "n1", flag]) == 1
    assert message in capsys.readouterr().err
