"""Flags are generated from the config dataclasses: every field with a flag parses to the same value
the dataclass would default to, and the README's tables are the generated ones."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from conserve.cli import build_parser
from conserve.cluster.config import ClusterConfig
from conserve.config import EngineConfig
from conserve.flag_docs import marked_tables, render_tables
from conserve.flags import flag_fields
from conserve.server.config import ServerConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_defaults_from_the_command_line_equal_the_dataclass_defaults():
    args = build_parser().parse_args(["serve"])
    assert EngineConfig.from_flags(args) == EngineConfig()
    assert ServerConfig.from_flags(args) == ServerConfig()
    assert ClusterConfig.from_flags(args) == ClusterConfig() and not ClusterConfig().uses_ray


def test_each_flag_sets_its_field():
    args = build_parser().parse_args(["serve", "--kv-cache-gb", "0.5", "--max-model-len", "512", "--scheduler",
                                      "sarathi", "--slo-tbt-ms", "80", "--port", "9001", "--api-key", "k"])
    config, server = EngineConfig.from_flags(args), ServerConfig.from_flags(args)
    assert (config.kv_cache_gb, config.max_model_len, config.scheduler, config.slo_tbt_ms) == (0.5, 512, "sarathi", 80)
    assert (server.port, server.api_key) == (9001, "k")
    assert build_parser().parse_args(["serve", "--kv-cache-gb", "auto"]).kv_cache_gb == "auto"


def test_every_flagged_field_has_help_and_every_command_that_runs_a_model_has_all_engine_flags():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("generate", "serve", "profile"):
        options = {o for a in sub.choices[command]._actions for o in a.option_strings}
        for f in flag_fields(EngineConfig):
            assert f.metadata["help"], f.name
            assert "--" + f.name.replace("_", "-") in options, (command, f.name)


def test_internal_fields_get_no_flag():
    flagged = {f.name for f in flag_fields(EngineConfig)}
    assert "seed" not in flagged and {f.name for f in dataclasses.fields(EngineConfig)} - flagged == {"seed"}


def test_readme_flag_tables_are_generated_and_current():
    text = README.read_text()
    assert sorted(marked_tables(text)) == ["ClusterConfig cluster", "EngineConfig coserving", "EngineConfig engine",
                                           "ServerConfig server"]
    assert render_tables(text) == text, "run: python -m conserve.flag_docs README.md"
