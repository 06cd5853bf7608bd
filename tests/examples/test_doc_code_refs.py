"""The docs point into the code as `path.py:LINE` next to the symbol defined there. Lines move
as the code changes; this keeps every such reference on the definition it names."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REF = re.compile(r"`([\w/]+\.py):(\d+)`")
SYMBOL = re.compile(r"`([A-Za-z_][\w.]*)(?:\(\))?`")


def definitions(path: Path) -> dict[str, int]:
    """Qualified name ("f", "Class", "Class.method") -> line of its def/class (decorators excluded)."""
    out = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                out.setdefault(name, child.lineno)
                if isinstance(child, ast.ClassDef):
                    walk(child, name + ".")
    walk(ast.parse(path.read_text()), "")
    return out


def doc_refs(text: str):
    """(symbol, path, line) for each reference: the symbol is the last `name` before it in the
    same paragraph that is not itself a reference."""
    for m in REF.finditer(text):
        yield symbol_before(text, m.start()), m.group(1), int(m.group(2))


def symbol_before(text: str, pos: int) -> str | None:
    para_start = text.rfind("\n\n", 0, pos) + 1
    names = [s for s in SYMBOL.findall(text[para_start:pos]) if not s.endswith(".py")]
    return names[-1] if names else None


def resolve(symbol: str, defs: dict[str, int]) -> int | None:
    """A doc symbol ("grpo.rollout.sample", "QwenVLAdapter.decode", "aggregate_loss") -> its line."""
    parts = symbol.split(".")
    for k in range(min(2, len(parts)), 0, -1):        # "Class.method" first, then the bare name
        if ".".join(parts[-k:]) in defs:
            return defs[".".join(parts[-k:])]
    return None


def test_definitions_and_refs_read_by_hand(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\n\n\ndef f():\n    pass\n\n\nclass A:\n    @property\n    def f(self):\n        pass\n")
    defs = definitions(src)
    assert defs == {"f": 4, "A": 8, "A.f": 10}
    assert resolve("A.f", defs) == 10 and resolve("pkg.m.f", defs) == 4 and resolve("g", defs) is None
    text = "Intro `x`.\n\nCalls `A.f` (`m.py:10`), then `pkg.f` (`m.py:4`)\nand `m.py:3`.\n\n`m.py:8`"
    assert list(doc_refs(text)) == [("A.f", "m.py", 10), ("pkg.f", "m.py", 4), ("pkg.f", "m.py", 3),
                                    (None, "m.py", 8)]


def test_every_code_reference_in_the_docs_is_on_its_definition():
    wrong, seen = [], 0
    for doc in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        for symbol, rel, line in doc_refs(doc.read_text()):
            seen += 1
            where = f"{doc.relative_to(ROOT)}: `{rel}:{line}`"
            if symbol is None:
                wrong.append(f"{where} names no symbol before it")
                continue
            target = ROOT / rel
            found = resolve(symbol, definitions(target)) if target.is_file() else None
            if found != line:
                wrong.append(f"{where} for `{symbol}`: " + (f"defined at line {found}" if found else
                                                             f"not defined in {rel}"))
    assert seen > 0 or not wrong
    assert not wrong, ("stale code references (`python tests/examples/test_doc_code_refs.py --fix` "
                       "rewrites the line numbers):\n" + "\n".join(wrong))


def fix(doc: Path) -> int:
    """Rewrite each reference of ``doc`` to the line where its symbol is defined; returns how many
    changed (references whose symbol cannot be found are left for a person)."""
    text, out, last, changed = doc.read_text(), [], 0, 0
    for m in REF.finditer(text):
        symbol, target = symbol_before(text, m.start()), ROOT / m.group(1)
        line = resolve(symbol, definitions(target)) if symbol and target.is_file() else None
        new = f"`{m.group(1)}:{line or m.group(2)}`"
        changed += new != m.group(0)
        out += [text[last:m.start()], new]
        last = m.end()
    doc.write_text("".join(out) + text[last:])
    return changed


if __name__ == "__main__":
    import sys
    if sys.argv[1:] != ["--fix"]:
        raise SystemExit("usage: python tests/examples/test_doc_code_refs.py --fix")
    for doc in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        if n := fix(doc):
            print(f"{doc.relative_to(ROOT)}: {n} reference(s) moved")
