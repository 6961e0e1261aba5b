import subprocess
import sys


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "app.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "version" in out.stdout


def test_each_subcommand_has_help():
    from app.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert sub.choices, "no subcommands registered"
    for name, p in sub.choices.items():
        text = p.format_help()
        assert name in text and "usage" in text
