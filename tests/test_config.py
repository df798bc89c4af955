"""The config's three doors (presets, command-line strings, papermill values) and its checks."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cozyrag_lib.config import (FIELDS, Config, coerce, list_presets, load_config, notebook_config,
                                parse_cli_overrides, validate)
from cozyrag_lib.errors import CozyError


# ----------------------------------------------------------------------------------------------
# presets


@pytest.mark.parametrize("name", ["tiny", "demo", "quality", "original", "hpc"])
def test_every_shipped_preset_loads_and_names_its_run(name):
    assert name in list_presets()
    cfg = load_config(name)
    assert cfg.run_name == name
    assert str(cfg.run_dir) == f"{cfg.out_root}/{name}"


def test_presets_differ_where_they_say_they_do():
    tiny, demo = load_config("tiny"), load_config("demo")
    assert tiny.generator == "tiny:gpt2" and tiny.max_articles == 200
    assert demo.generator == "embedded:smollm2-135m-instruct" and demo.max_articles == 0
    assert tiny.retriever == demo.retriever == "embedded:all-minilm-l6-v2"


def test_defaults_are_valid():
    assert validate(Config()) == Config()


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(CozyError, match=r"preset 'tinny' not found \(known presets: demo, hpc, original, quality, tiny"):
        load_config("tinny")


def test_preset_from_a_toml_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('# my run\nrun_name = "mine"\ntop_k = 9\nphases = ["retriever"]\n')
    cfg = load_config(str(path))
    assert (cfg.run_name, cfg.top_k, cfg.phases) == ("mine", 9, ["retriever"])


def test_preset_file_with_unknown_key_or_bad_toml_names_the_file(tmp_path):
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text("top_kk = 3\n")
    with pytest.raises(CozyError, match=r"bad_key.toml: unknown config key 'top_kk' \(did you mean top_k"):
        load_config(str(bad_key))
    bad_toml = tmp_path / "bad_toml.toml"
    bad_toml.write_text("top_k = = 3\n")
    with pytest.raises(CozyError, match=r"bad_toml.toml: not valid TOML"):
        load_config(str(bad_toml))
    bad_type = tmp_path / "bad_type.toml"
    bad_type.write_text('top_k = "many"\n')
    with pytest.raises(CozyError, match=r"bad_type.toml: top_k='many' is not a valid int"):
        load_config(str(bad_type))


# ----------------------------------------------------------------------------------------------
# overrides: command-line strings and papermill's typed values


def test_cli_strings_are_parsed_to_field_types():
    preset, overrides = parse_cli_overrides(["--preset", "tiny", "--top_k=8", "--lr_generator", "1e-4", "--do_sample",
                                             "--phases=generator,retriever", "--qa_sources=builtin, a.json",
                                             "--run_name=x=1"])
    assert preset == "tiny"
    cfg = load_config(preset, overrides)
    assert cfg.top_k == 8 and cfg.lr_generator == 1e-4 and cfg.do_sample is True  # `--KEY VALUE`; a bool alone
    assert cfg.phases == ["generator", "retriever"]
    assert cfg.qa_sources == ["builtin", "a.json"]  # spaces after commas dropped
    assert cfg.run_name == "x=1"  # only the first '=' splits
    assert cfg.generator == "tiny:gpt2"  # untouched keys keep the preset's value


def test_papermill_typed_values_are_accepted():
    # papermill -p turns "8" into 8, "1e-4" into 1e-4, "0" into 0 and "True" into True
    cfg = load_config("tiny", {"top_k": 8, "lr_generator": 1e-4, "lr_retriever": 0, "do_sample": True,
                               "qa_sources": ["builtin"], "corpus_sources": "embedded,extra.jsonl"})
    assert cfg.top_k == 8 and cfg.lr_retriever == 0.0 and isinstance(cfg.lr_retriever, float)
    assert cfg.do_sample is True and cfg.qa_sources == ["builtin"]
    assert cfg.corpus_sources == ["embedded", "extra.jsonl"]


@pytest.mark.parametrize("args, message", [
    (["--tpo_k=3"], r"command line: unknown option --tpo_k \(did you mean --top_k\?\)$"),
    (["--chunk_max_token=9"], r"did you mean --chunk_max_tokens\?"),
    (["--zzzz=1"], r"unknown option --zzzz$"),
    (["--lr-generator=1e-4"], r"unknown option --lr-generator \(did you mean --lr_generator\?\)$"),  # no hyphens
    (["--top_k=eight"], r"top_k='eight' is not a valid int"),
    (["--top_k=2.5"], r"top_k='2.5' is not a valid int"),
    (["--lr_generator=fast"], r"lr_generator='fast' is not a valid float"),
    (["--do_sample=maybe"], r"do_sample='maybe' is not a valid bool"),
    (["top_k=3"], r"argument 'top_k=3': expected --key=value"),
    (["--top_k"], r"--top_k needs a value \(--top_k=VALUE\)"),
    (["--top_k", "--seed=1"], r"--top_k needs a value"),
    (["--debug=maybe"], r"debug='maybe' is not a valid bool"),
])
def test_bad_cli_overrides_are_errors(args, message):
    with pytest.raises(CozyError, match=message):
        parse_cli_overrides(args)


@pytest.mark.parametrize("key, value", [
    ("top_k", 2.5), ("top_k", True), ("top_k", None), ("lr_generator", True), ("lr_generator", "x"),
    ("do_sample", 1), ("do_sample", "perhaps"), ("run_name", 3), ("phases", [1, 2]), ("qa_sources", {"a": 1}),
])
def test_wrong_types_are_errors(key, value):
    with pytest.raises(CozyError, match=rf"{key}=.* is not a valid"):
        coerce(key, value)


@pytest.mark.parametrize("key, value, message", [
    ("top_k", 0, "top_k must be positive, got 0"),
    ("batch_size", -2, "batch_size must be positive"),
    ("chunk_max_tokens", 0, "chunk_max_tokens must be positive"),
    ("lr_generator", -1e-4, "lr_generator must not be negative"),
    ("max_articles", -1, "max_articles must not be negative"),
    ("temperature", 0.0, "temperature must be positive"),
    ("retriever_loss", "hinge", "retriever_loss must be lm_supervised or contrastive"),
    ("qa_format", "xml", "qa_format must be"),
    ("device", "tpu", "device must be auto, cpu or cuda"),
    ("phases", ["generator", "critic"], "phases may hold only"),
    ("phases", [], "phases is empty"),
    ("context_order", "random", "context_order must be relevance or passage"),
    ("run_name", "a/b", "run_name must be a plain folder name"),
    ("run_name", "..", "run_name must be a plain folder name"),
])
def test_nonsensical_values_are_errors(key, value, message):
    with pytest.raises(CozyError, match=message):
        load_config("tiny", {key: value})


@settings(max_examples=40, deadline=None)
@given(top_k=st.integers(1, 10**6), lr=st.floats(0, 1, allow_nan=False), phases=st.lists(
    st.sampled_from(["generator", "retriever"]), min_size=1, max_size=6))
def test_cli_string_and_typed_value_give_the_same_config(top_k, lr, phases):
    from_strings = load_config("tiny", {"top_k": str(top_k), "lr_generator": repr(lr), "phases": ",".join(phases)})
    from_values = load_config("tiny", {"top_k": top_k, "lr_generator": lr, "phases": phases})
    assert from_strings == from_values


# ----------------------------------------------------------------------------------------------
# notebooks


def _notebook_globals(**params):
    """What a notebook's globals look like to notebook_config: IPython's own names plus the parameters."""
    import math

    return {"In": [""], "Out": {}, "_": None, "_i1": "", "get_ipython": lambda: None, "exit": None,
            "math": math, "notebook_config": notebook_config, **params}


def test_notebook_config_takes_parameters_and_ignores_ipython_names():
    cfg = notebook_config(_notebook_globals(preset="tiny", top_k=8, max_articles=None, run_name="nb"))
    assert (cfg.top_k, cfg.run_name) == (8, "nb")
    assert cfg.max_articles == 200  # None = the preset's value


def test_notebook_config_rejects_a_misspelt_parameter():
    with pytest.raises(CozyError, match="notebook parameter 'chunk_max_token' is not a config key"):
        notebook_config(_notebook_globals(preset="tiny", chunk_max_token=96))


def test_notebook_config_rejects_a_wrong_type():
    with pytest.raises(CozyError, match="top_k='many' is not a valid int"):
        notebook_config(_notebook_globals(preset="tiny", top_k="many"))


def test_notebook_preset_none_falls_back_to_environment_then_demo(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)  # no outputs/runs here
    monkeypatch.delenv("COZYRAG_PRESET", raising=False)
    assert notebook_config(_notebook_globals(preset=None)).run_name == "demo"
    assert capsys.readouterr().out.startswith("preset demo (the default: no preset parameter, no $COZYRAG_PRESET")
    monkeypatch.setenv("COZYRAG_PRESET", "tiny")
    assert notebook_config(_notebook_globals(preset=None)).run_name == "tiny"
    assert capsys.readouterr().out == "preset tiny (from $COZYRAG_PRESET)\n"
    # a preset the notebook (or papermill) names explicitly wins over the environment
    assert notebook_config(_notebook_globals(preset="hpc")).run_name == "hpc"
    assert capsys.readouterr().out == "preset hpc (the notebook's preset parameter)\n"


def test_notebook_preset_none_continues_the_most_recent_run(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COZYRAG_PRESET", raising=False)
    old = load_config("hpc", run_name="old")
    old.save(old.paths.config(old.paths.qa))
    mine = load_config("tiny", run_name="mine", max_articles=50)
    for i, stage in enumerate((mine.paths.qa, mine.paths.passages_dir)):
        mine.save(mine.paths.config(stage))
        os.utime(mine.paths.config(stage), (2e9 + i, 2e9 + i))  # newer than the hpc run
    (tmp_path / "outputs" / "runs" / "junk").mkdir()  # a folder without configs is no run
    cfg = notebook_config(_notebook_globals(preset=None, top_k=7, run_name=None))
    # the run's own settings (its run_name and max_articles too), the notebook's parameters on top
    assert (cfg.preset, cfg.run_name, cfg.max_articles, cfg.top_k) == ("tiny", "mine", 50, 7)
    out = capsys.readouterr().out
    assert out.startswith("preset tiny: the settings of the most recent run, outputs/runs/mine (passages/config.json, ")
    # the environment and the parameter still win over the run
    monkeypatch.setenv("COZYRAG_PRESET", "demo")
    assert notebook_config(_notebook_globals(preset=None)).run_name == "demo"
    assert notebook_config(_notebook_globals(preset="hpc")).run_name == "hpc"


def test_latest_run_skips_a_config_it_cannot_read(tmp_path, capsys):
    from cozyrag_lib.config import latest_run

    assert latest_run(tmp_path / "nowhere") is None
    good = load_config("tiny", out_root=str(tmp_path), run_name="good")
    good.save(good.paths.config(good.paths.qa))
    bad = good.paths.config(load_config("tiny", out_root=str(tmp_path), run_name="bad").paths.qa)
    bad.parent.mkdir(parents=True)
    bad.write_text('{"top_kk": 3}')
    os.utime(bad, (2e9, 2e9))
    path, values = latest_run(tmp_path)
    assert path == good.paths.config(good.paths.qa) and values["run_name"] == "good"
    out = capsys.readouterr().out
    assert out.startswith(f"note: {bad}: skipped") and "unknown config key 'top_kk'" in out


def test_load_config_records_the_preset_and_a_resolved_copy_keeps_it(tmp_path):
    from cozyrag_lib.launch import config_toml

    cfg = load_config("tiny", top_k=3)
    assert cfg.preset == "tiny"
    toml = tmp_path / "launch.toml"
    toml.write_text(config_toml(cfg))
    assert load_config(str(toml)) == cfg  # the preset named inside the file, not the file's path
    assert load_config(None).preset == ""


# ----------------------------------------------------------------------------------------------
# the resolved config travels with every artefact


def test_resolved_config_is_saved_as_json_and_reloads_equal(tmp_path):
    cfg = load_config("tiny", {"top_k": 7, "phases": "retriever,generator", "lr_retriever": 3e-5})
    path = tmp_path / "deep" / "config.json"
    cfg.save(path)
    data = json.loads(path.read_text())
    assert set(data) == set(FIELDS) and data["top_k"] == 7
    assert load_config(None, data) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temporary file left behind


def test_list_values_accept_json_lists_and_commas():
    from cozyrag_lib.config import coerce

    assert coerce("corpus_sources", '["/scratch/wiki, part 1", "embedded"]') == ["/scratch/wiki, part 1", "embedded"]
    assert coerce("corpus_sources", "a, b") == ["a", "b"]
    with pytest.raises(CozyError):
        coerce("corpus_sources", "[not json")


def test_notebook_config_can_be_rerun_after_results_exist(monkeypatch, tmp_path):
    from cozyrag_lib.config import notebook_config

    monkeypatch.chdir(tmp_path)
    ns = {"preset": "tiny", "top_k": 7, "run_name": None}
    cfg = notebook_config(ns)
    ns.update(cfg=cfg, summary={"n": 1})  # what later cells leave behind in the kernel
    assert notebook_config(ns).top_k == 7


def test_notebook_config_moves_a_notebooks_kernel_to_the_project_root(monkeypatch, tmp_path):
    from cozyrag_lib.config import notebook_config

    (tmp_path / "cozyrag_lib").mkdir()
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    notebook_config({"preset": "tiny"})
    assert Path.cwd() == tmp_path
