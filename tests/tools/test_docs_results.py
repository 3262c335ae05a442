"""``make docs-results`` (tools/docs_results.py): a docs block is rewritten from its run, with the date and the
command; a block whose run is absent is kept; ``--check`` fails when a block differs from its run."""

import importlib.util
import json
import os

import pytest

from tests.conftest import ROOT


@pytest.fixture
def tool(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("docs_results", os.path.join(ROOT, "tools", "docs_results.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    docs = tmp_path / "README.md"
    docs.write_text("# x\n\nbefore\n<!-- results: demo-metrics -->\nTYPED 0.5\n<!-- /results -->\n"
                    "<!-- results: long-run -->\nTYPED long\n<!-- /results -->\nafter\n")
    monkeypatch.setattr(mod, "BLOCKS", {"demo-metrics": (str(docs), None, mod.demo_metrics),
                                        "long-run": (str(docs), ["real/absent"], mod.markdown_file("t.md", "cmd"))})
    return mod, docs


def _demo(folder, auc=0.75):
    os.makedirs(folder, exist_ok=True)
    row = {"auc": auc, "f1": 0.5, "accuracy": 0.625, "cam_energy_in_box": 0.25, "n": 8, "positives": 4,
           "minutes": 1.5, "threads": 2}
    with open(os.path.join(folder, "demo_results.json"), "w") as f:
        json.dump({"none": row, "cut_remain": {**row, "auc": 0.5}}, f)


def test_blocks_are_rewritten_from_their_run_and_absent_runs_kept(tool, tmp_path):
    mod, docs = tool
    demo = tmp_path / "demo"
    _demo(demo)
    assert mod.regenerate(str(tmp_path / "runs"), str(demo), check=True) == 1  # typed text differs from the run
    assert "TYPED 0.5" in docs.read_text()  # --check writes nothing
    assert mod.regenerate(str(tmp_path / "runs"), str(demo), check=False) == 0
    text = docs.read_text()
    assert "TYPED 0.5" not in text and "| none | 0.750 | 0.500 | 0.625 | 0.250 |" in text
    assert "| cut_remain | 0.500 |" in text and "2 CPU threads" in text and "`python -m cutremain_monai.demo`" in text
    assert "TYPED long" in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
    assert mod.regenerate(str(tmp_path / "runs"), str(demo), check=True) == 0  # now in step (dates ignored)
    _demo(demo, auc=0.875)
    assert mod.regenerate(str(tmp_path / "runs"), str(demo), check=True) == 1  # a new run changes the table


def test_a_docs_file_without_its_marker_is_reported(tool, tmp_path, capsys):
    mod, docs = tool
    docs.write_text("no markers here\n")
    _demo(tmp_path / "demo")
    assert mod.regenerate(str(tmp_path / "runs"), str(tmp_path / "demo"), check=True) == 1
    assert "no marker for block 'demo-metrics'" in capsys.readouterr().out
