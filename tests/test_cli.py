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


def test_cli_starts_without_the_service_stack():
    """The CLI imports each command's dependencies when the command runs, so `rmamba evaluate` / `train` work on a
    machine with only the model stack (the GPU machine: no database, MLflow, dashboard or scheduler packages)."""
    code = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in ('sqlalchemy', 'mlflow', 'streamlit', 'apscheduler', 'alembic'):\n"
        "        raise ModuleNotFoundError(name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "from app.cli import main\n"
        "sys.exit(main(['evaluate', '--help']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--dataset" in out.stdout
