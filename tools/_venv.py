"""Makes `tools/<name>` work from the repo root without activating the virtual environment.

If the project's .venv exists and we are not already running inside it, re-execute the tool with
the venv's interpreter so that torch and the project packages are importable.
"""
import os
import sys


def ensure_venv() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv_python = os.path.join(root, ".venv", "bin", "python")
    if os.path.exists(venv_python) and os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(root, ".venv")):
        os.execv(venv_python, [venv_python, *sys.argv])
    if root not in sys.path:
        sys.path.insert(0, root)
