"""The dependency direction of DESIGN.md, enforced by parsing every import."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# importer prefix -> our modules it may import (studio.errors is the shared leaf everyone may use)
ALLOWED = {
    "studio.errors": set(),
    "studio.adapters": {"studio.adapters", "studio.errors"},
    "studio.shapes": {"studio.shapes", "studio.errors"},
    "studio.prompt": {"studio.prompt", "studio.adapters", "studio.errors"},
    "studio.models": {"studio.errors"},
    "studio.allocator": set(),
    "studio.text_world": {"studio.errors"},
    "studio.text": {"studio.text", "studio.adapters", "studio.prompt", "studio.formats", "studio.models",
                    "studio.text_world", "studio.errors"},
    "studio.config": {"studio.errors"},
    "studio.formats": {"studio.formats", "studio.adapters", "studio.prompt", "studio.errors"},
    "studio.pipeline": {"studio.pipeline", "studio.adapters", "studio.formats", "studio.models", "studio.shapes",
                        "studio.errors"},
    "trainers": {"trainers", "studio.allocator", "studio.adapters", "studio.prompt", "studio.formats", "studio.models",
                 "studio.config", "studio.pipeline", "studio.shapes", "studio.text_world", "studio.text",
                 "studio.errors"},
    "studio.ui": {"studio"},  # anything but tensor code; checked below for trainers only through the CLI
    "studio.cli": {"studio", "trainers"},
    "studio.demo": {"studio.adapters", "studio.errors"},
    "studio.__main__": {"studio.cli"},
    "studio": {"studio"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _ours(name: str) -> bool:
    return name == "studio" or name.startswith(("studio.", "trainers"))


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from studio import formats` imports studio.formats
                full = f"{node.module}.{alias.name}"
                found.add(full if _is_module(full) else node.module)
    return {n for n in found if _ours(n)}


def _rule(module: str) -> set[str]:
    best = max((k for k in ALLOWED if module == k or module.startswith(k + ".")), key=len)
    return ALLOWED[best]


def test_every_import_points_down():
    files = sorted((ROOT / "studio").rglob("*.py")) + sorted((ROOT / "trainers").rglob("*.py"))
    assert files
    violations = []
    for path in files:
        module = _module_name(path)
        allowed = _rule(module)
        for imported in _imports(path):
            if not any(imported == a or imported.startswith(a + ".") for a in allowed):
                violations.append(f"{module} imports {imported}")
    assert violations == []


def test_the_rule_catches_a_violation():
    assert _rule("studio.adapters.lora") == {"studio.adapters", "studio.errors"}
    assert not any("studio.formats".startswith(a) for a in _rule("studio.adapters.mix"))
