from __future__ import annotations

from pathlib import Path

import pytest

from hdvg.config import ConfigError, from_dict, load_pipeline, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "pipelines").glob("*.yaml")
                                        if not p.name.startswith("t2v")))  # fmt: skip
def test_shipped_recipes_load(name):
    cfg = load_pipeline(ROOT / "pipelines" / name)
    assert cfg.filters, name
    assert len(cfg.hash()) == 16


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"scenes": {"detecter": "adaptive"}}, "detecter"),
        ({"scenes": {"detector": "magic"}}, "scenes.detector"),
        ({"scenes": {"max_clip_s": "long"}}, "scenes.max_clip_s"),
        ({"filters": {"resolutoin": {}}}, "resolutoin"),
        (
            {"filters": {"resolution": {"min_short_side": "hd"}}},
            "filters.resolution.min_short_side",
        ),
        ({"filters": {"duration": {"minimum": 2}}}, "minimum"),
        ({"shards": {"max_samples": True}}, "shards.max_samples"),
        ({"cut": {"mode": "copy-ish"}}, "cut.mode"),
        ({"bogus": 1}, "^top level: unknown key\\(s\\) bogus; known: clip_stages, "),
        ({"models": {"cpu_nice": 25}}, "models.cpu_nice"),
    ],
)
def test_bad_config_names_the_key(raw, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        from_dict(raw)


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_curate_limit_must_be_positive(value, capsys):
    from hdvg.cli import main

    with pytest.raises(SystemExit) as e:  # argparse, before a source is read or Ray started
        main(["curate", "pipelines/smoke.yaml", "--input", "x", "--output", "y", "--limit", value])
    assert e.value.code == 2
    assert f"--limit: must be a whole number >= 1, not '{value}'" in capsys.readouterr().err


def test_overrides_and_hash():
    a = from_dict({"filters": {"duration": {"min_s": 2.0}}})
    b = from_dict({"filters": {"duration": {"min_s": 2.0}}},
                  overrides=parse_overrides(["filters.duration.min_s=3"]))  # fmt: skip
    assert b.filters["duration"]["min_s"] == 3
    assert a.hash() != b.hash()
    c = from_dict({"filters": {"duration": {"min_s": 2.0}}, "ray": {"num_cpus": 1}})
    assert a.hash() == c.hash()  # where it ran does not change what it produced
