"""The command line as a user's manual: every command and experiment kind answers --help, a kind takes only its
own flags, and --help does not load torch."""

import subprocess
import sys

import pytest

from cutremain_monai.cli import build_parser
from tests.conftest import ROOT

KINDS = ["cv", "compare", "premise", "gamma", "shortcut", "erase", "psl", "background", "severity-baselines", "severity-cv",
         "severity-guidance", "self-train"]


@pytest.mark.parametrize("argv", [["--help"], ["experiment", "--help"]] + [["experiment", k, "--help"] for k in KINDS]
                         + [[c, "--help"] for c in ("ingest", "import", "samples", "infer", "listen", "send",
                                                    "deidentify", "localize")])
def test_every_command_answers_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 0 and "usage: cutremain" in capsys.readouterr().out


def test_a_kind_takes_only_its_own_flags(capsys):
    args = build_parser().parse_args(["experiment", "compare", "--bundle", "b", "--methods", "none,isnet_free", "--shrink", "256"])
    assert args.kind == "compare" and args.methods == "none,isnet_free" and args.shrink == 256
    with pytest.raises(SystemExit) as e:  # --shrink belongs to compare, not to shortcut
        build_parser().parse_args(["experiment", "shortcut", "--bundle", "b", "--shrink", "256"])
    assert e.value.code == 2 and "unrecognized arguments: --shrink 256" in capsys.readouterr().err
    help_text = build_parser()._subparsers._group_actions[0].choices["experiment"]
    assert set(KINDS) == set(help_text._subparsers._group_actions[0].choices)


def test_help_does_not_import_torch():
    code = "import sys; from cutremain_monai.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
