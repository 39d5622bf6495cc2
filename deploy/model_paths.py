"""Where models live: `demo` is the checkpoint bundled in the repository; anything else is a directory."""
from __future__ import annotations

from pathlib import Path

from deploy.app_config import DEMO_MODEL
from model.errors import UserError

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"


def resolve_model_dir(model: str) -> Path:
    path = DEMO_MODEL_DIR if model == DEMO_MODEL else Path(model)
    if not (path / "config.json").is_file() and not (path / "original" / "config.json").is_file():
        raise UserError(f"{path}: not a gpt-oss model directory (no config.json)")
    return path


def served_name(model: str, served_model_name: str | None) -> str:
    if served_model_name:
        return served_model_name
    return "gpt-oss-demo" if model == DEMO_MODEL else Path(model).resolve().name
