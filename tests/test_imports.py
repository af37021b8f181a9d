"""Import structure: no module in train/ imports the CLI, the project's modules form no import circle, and the
layers point one way: only the command layer of ldm/ reaches train/, and no stage script or bench imports a
stage script (bench/ and train/cache.py take stage 2's pieces from ldm/, not from train/unet.py).

Read from the source with `ast` (every import statement, function-local ones included), so nothing is imported.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ldm", "train", "pipelines")


def project_modules():
    """{dotted module name: path} for every .py file in the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(path):
    """Every absolute module name an import statement in `path` may refer to (`from a import b` → a, a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def import_graph():
    modules = project_modules()
    return {name: sorted(n for n in imported_names(path) if n in modules and n != name)
            for name, path in modules.items()}


def find_cycle(graph):
    """One import circle as a list [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in graph:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_training_stage_imports_the_cli():
    offenders = {path.name: sorted(n for n in imported_names(path) if n == "ldm.cli" or n.startswith("ldm.cli."))
                 for path in (ROOT / "train").glob("*.py")}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_no_import_circle():
    graph = import_graph()
    assert {"ldm.cli", "ldm.entry", "train.unet"} <= set(graph)  # the graph sees the modules it should
    assert "ldm.entry" in graph["train.unet"] and "ldm.demo" in graph["ldm.cli"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_detects_the_old_circle():
    """The check would have caught the circle train/* -> ldm.cli -> ldm.demo -> train/*."""
    old = {"train.unet": ["ldm.cli"], "ldm.cli": ["ldm.demo"], "ldm.demo": ["train.unet"], "ldm.config": []}
    assert find_cycle(old) == ["train.unet", "ldm.cli", "ldm.demo", "train.unet"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None


def test_stage_entry_parses_and_calls(tmp_path):
    """`python -m train.<stage>` still reaches main(cfg) through ldm.entry, with --set overrides applied."""
    from ldm.entry import stage_entry

    config = tmp_path / "vae.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\n")
    cfg = stage_entry("vae", lambda cfg: cfg, ["--config", str(config), "--set", "train.max_steps=7"])
    assert cfg.train.max_steps == 7 and str(cfg.output_dir) == str(tmp_path / "out")


COMMAND_LAYER = {"ldm.cli", "ldm.demo", "ldm.recipe", "ldm.stages"}  # above train/: they may import it


def _train_imports(path):
    return sorted(n for n in imported_names(path) if n == "train" or n.startswith("train."))


def test_the_library_below_the_command_layer_never_imports_train():
    modules = project_modules()
    assert COMMAND_LAYER <= set(modules)
    offenders = {name: _train_imports(path) for name, path in modules.items()
                 if name.split(".")[0] == "ldm" and name not in COMMAND_LAYER}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_benches_and_the_cache_entry_import_nothing_from_train_unet():
    files = sorted((ROOT / "bench").glob("*.py")) + [ROOT / "train" / "cache.py"]
    offenders = {path.relative_to(ROOT).as_posix(): [n for n in imported_names(path)
                                                     if n == "train.unet" or n.startswith("train.unet.")]
                 for path in files}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_no_stage_script_or_bench_imports_a_stage_script():
    files = sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "train").glob("*.py"))
    offenders = {path.relative_to(ROOT).as_posix(): _train_imports(path) for path in files}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_checks_see_an_offender():
    """The parsing the layer tests rely on catches both spellings of an import of train/unet.py."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "offender.py"
        path.write_text("def f():\n    from train import unet\n    import train.unet as u\n")
        assert {"train", "train.unet"} <= imported_names(path) and _train_imports(path) == ["train", "train.unet"]


def test_the_u_net_stage_starts_without_importing_open_clip():
    """open_clip (with torchvision and torch._dynamo: ~2 s of every launch) loads only where it is used."""
    import subprocess
    import sys

    code = "import sys, train.unet, ldm.cli; print(sorted(m for m in sys.modules if m.startswith('open_clip')))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
