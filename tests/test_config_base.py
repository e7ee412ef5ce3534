"""`base:` in config files (harmony_mcore.config.config_layers): the recipes as one base plus their
differences, resolving to exactly the full files they replaced; precedence, chains and refusals; and
`harmony-mcore plan --show-config`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from harmony_mcore.config import ConfigError, config_layers, load_config, resolve_yaml
from harmony_mcore.plan import config_lines

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
# The mappings of the eight recipes as full files, before they were split into a base and differences.
FULL = json.loads((Path(__file__).parent / "fixtures" / "recipes_full.json").read_text())
TINY = {"model": {"hf_path": "/m", "preset": "qwen3-1.7b"}, "train": {"questions_per_step": 8}}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_resolves_to_its_former_full_file(path, tmp_path):
    resolved = OmegaConf.to_container(resolve_yaml(path))
    assert json.dumps(resolved, sort_keys=True) == json.dumps(FULL[path.stem], sort_keys=True)  # types too
    full = tmp_path / "full.yaml"
    full.write_text(OmegaConf.to_yaml(FULL[path.stem]))
    assert load_config(path).to_dict() == load_config(full).to_dict()


def test_every_recipe_is_covered_and_states_only_its_differences():
    assert sorted(FULL) == [p.stem for p in RECIPES]
    for path in RECIPES:
        (base_file, base), (file, own) = config_layers(path)
        assert file == path and base_file.name == "self_harmony_math500.yaml"
        base, own = OmegaConf.to_container(base), OmegaConf.to_container(own)
        restated = [f"{s}.{k}" for s in own for k in own[s] if base.get(s, {}).get(k, object()) == own[s][k]]
        assert not restated, f"{path.name} repeats its base: {restated}"


def write(path: Path, tree: dict, base: str | None = None) -> Path:
    path.write_text((f"base: {base}\n" if base else "") + (OmegaConf.to_yaml(tree) if tree else ""))
    return path


def test_precedence_base_then_file_then_command_line(tmp_path):
    (tmp_path / "b").mkdir()
    write(tmp_path / "b" / "root.yaml", {**TINY, "optim": {"lr": 1e-5, "min_lr": 1e-7}, "eval": {"k": 4}})
    write(tmp_path / "b" / "mid.yaml", {"optim": {"lr": 2e-5}, "rollout": {"strategies": ["A", "B"]}},
          base="root.yaml")  # relative to b/, the file's own directory
    top = write(tmp_path / "top.yaml", {"optim": {"lr": 3e-5}, "rollout": {"strategies": ["C"]}},
                base="b/mid.yaml")
    cfg = load_config(top, ["eval.k=8"])
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.eval.k) == (3e-5, 1e-7, 8)
    assert cfg.rollout.strategies == ["C"]  # a list is replaced, not merged
    assert cfg.model.preset == "qwen3-1.7b"  # from two bases up
    assert [p.name for p, _ in config_layers(top)] == ["root.yaml", "mid.yaml", "top.yaml"]
    assert "base" not in resolve_yaml(top)


def test_cycle_is_refused_naming_the_files(tmp_path):
    write(tmp_path / "a.yaml", TINY, base="b.yaml")
    write(tmp_path / "b.yaml", {}, base="a.yaml")
    with pytest.raises(ConfigError, match=r"chain loops: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", TINY, base="self.yaml")
    with pytest.raises(ConfigError, match=r"self\.yaml -> .*self\.yaml"):
        load_config(tmp_path / "self.yaml")


def test_bad_bases_name_the_files(tmp_path):
    write(tmp_path / "top.yaml", TINY, base="nope.yaml")
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found \(the base of .*top\.yaml\)"):
        load_config(tmp_path / "top.yaml")
    (tmp_path / "num.yaml").write_text("base: 3\n")
    with pytest.raises(ConfigError, match=r"num\.yaml: base: must be the path"):
        load_config(tmp_path / "num.yaml")
    write(tmp_path / "root.yaml", {**TINY, "parallel": {"tpp": 2}})
    write(tmp_path / "child.yaml", {}, base="root.yaml")
    with pytest.raises(ConfigError, match=r"root\.yaml \(base of .*child\.yaml\): parallel\.tpp"):
        load_config(tmp_path / "child.yaml")


def test_plan_shows_the_chain_and_where_each_key_comes_from():
    path = REPO / "configs" / "recipes" / "llama31_8b_instruct_math500_2x8.yaml"
    overrides = ["rollout.gpu_memory_utilization=0.55"]
    cfg = load_config(path, overrides)
    assert config_lines(cfg, path, overrides, every_key=False) == [
        f"config      {path}, extends {path.parent / 'base' / 'self_harmony_math500.yaml'}; "
        "1 command-line override(s)"]
    lines = config_lines(cfg, path, overrides, every_key=True)
    row = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert "= 16 " in row["rollout.n_per_view"]
    assert row["rollout.n_per_view"].endswith("(base/self_harmony_math500.yaml)")
    assert '"chat"' in row["rollout.prompt_style"] and row["rollout.prompt_style"].endswith(f"({path.name})")
    assert "= 0.55 " in row["rollout.gpu_memory_utilization"]
    assert row["rollout.gpu_memory_utilization"].endswith("(command line)")
    assert len(row) == sum(1 for _ in _leaves(FULL[path.stem]))  # what the files set, no defaults


def _leaves(tree: dict):
    for value in tree.values():
        yield from _leaves(value) if isinstance(value, dict) else [value]
