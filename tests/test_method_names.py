"""No module outside ``studio/adapters/<method>.py`` branches on a method's name.

Everything else reads ``registry.METHODS`` and each method's ``TRAITS``; a comparison with a
method's name, a dict keyed by method names or a hand-kept list of them would have to be edited
for every new method (the twelve-file problem core v2 removed). Parsed with ast, so strings in
messages and docstrings are fine.
"""

import ast
from pathlib import Path

from studio.adapters.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]
NAMES = set(METHODS)


def _names_in(node) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and n.value in NAMES]


def _violations(path: Path) -> list[str]:
    own = path.stem if path.parent == ROOT / "studio" / "adapters" else None
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        hits = []
        if isinstance(node, ast.Compare):
            hits = [n for side in [node.left, *node.comparators] if isinstance(side, (ast.Constant, ast.Tuple, ast.List,
                                                                                       ast.Set))
                    for n in _names_in(side)]
        elif isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in NAMES]
            hits = keys if len(keys) >= 2 else []
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = [e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in NAMES]
            hits = items if len(items) >= 2 else []
        elif isinstance(node, ast.match_case):
            hits = _names_in(node.pattern)
        hits = [h for h in hits if h != own]
        if hits:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {sorted(set(hits))}")
    return found


def test_no_module_branches_on_a_method_name():
    files = [p for folder in ("studio", "trainers") for p in (ROOT / folder).rglob("*.py")]
    assert len(files) > 50
    violations = [v for p in files for v in _violations(p)]
    assert not violations, "\n".join(violations)


def test_the_check_catches_a_branch(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('def f(m):\n    return 1 if m == "svf" else {"lora": 1, "dora": 2}[m]\n')
    assert len(_violations_outside_root(probe)) == 2


def _violations_outside_root(path: Path) -> list[str]:
    global ROOT
    saved, ROOT = ROOT, path.parent
    try:
        return _violations(path)
    finally:
        ROOT = saved
