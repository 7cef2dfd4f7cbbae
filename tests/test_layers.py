"""The import graph keeps the layers of docs/design.md: no import circle among the modules of
src/ (function-local imports included), no import from a lower layer to a higher one, and
bench/ and scripts/ reach src/ only through its public API (src/api.py). The graph is read
from the source with `ast`, so nothing is imported or run."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ("eval.py", "quant.py", "export.py")
SCRIPT_DIRS = ("bench", "scripts")

# Lowest first. A module may import modules of its own layer or of a lower one, never of a
# higher one; a module belongs to the entry of the longest matching dotted prefix. Within a
# layer, the cycle check keeps the order.
LAYERS = [
    ("base", ["src", "src.utils", "src.kernels"]),  # files, errors, signals, CLI wrapper; native kernels
    ("foundation", ["src.config", "src.distributed", "src.plots"]),  # config schema; collectives; plots
    ("models and data", ["src.models", "src.data", "src.run_folder"]),
    ("quantizer", ["src.quant.quantizer", "src.quant.packing"]),  # fake quantization, bit packing
    ("quantized cells", ["src.quant.layers"]),
    ("conversion", ["src.quant.convert"]),  # FP model -> quantized model, checkpoints
    ("search", ["src.quant.search", "src.quant.block_recon"]),  # candidate scoring, block reconstruction
    ("calibration", ["src.quant.calibrate"]),  # the Method interface, registry and stage loop
    ("methods", ["src.quant.vtptq", "src.quant.vtptq_plus"]),  # registered calibration methods
    ("bit allocation", ["src.quant.mixed_precision", "src.quant.mp_refined"]),
    ("quant package", ["src.quant"]),  # src/quant/__init__.py: registers the methods
    ("export", ["src.export"]),
    ("engine", ["src.engine", "src.sharded"]),  # evaluation, model building, sharded evaluation
    ("api", ["src.api"]),  # what scripts use
    ("entry points", ["eval", "quant", "export", "bench", "scripts"]),
]

# bench/ and scripts/ import from src/ only this (the entry points eval.py, quant.py and
# export.py are allowed too: bench/embedded_table.py and bench/calib_scaling.py run quant.py's
# suite and command line as a user would).
PUBLIC = {"src", "src.api"}  # src/__init__.py is empty: importing src.api runs it


def layer_of(module):
    best, rank = None, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best)):
                best, rank = prefix, i
    return rank


def module_files():
    """{dotted module name: path} of src/, the entry points, bench/ and scripts/."""
    found = {}
    for top in ("src",) + SCRIPT_DIRS:
        for folder, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for f in sorted(files):
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), REPO)[:-3].split(os.sep)
                    found[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, f)
    for f in ENTRY_POINTS:
        found[f[:-3]] = os.path.join(REPO, f)
    return found


def imports_of(module, source, known, is_package=False):
    """[(imported module, line)] of every import statement in `source` (any depth), resolved
    to the modules in `known`; importing a module outside its package also counts as importing
    the package (Python runs the package's __init__ first)."""
    package = module if is_package else module.rpartition(".")[0]
    siblings = module.split(".")[0] if module.split(".")[0] in SCRIPT_DIRS else None
    out = []

    def add(name, line):
        candidates = [name] + ([f"{siblings}.{name}"] if siblings else [])
        for cand in candidates:
            while cand and cand not in known:
                cand = cand.rpartition(".")[0]
            if cand:
                out.append((cand, line))
                parts = cand.split(".")
                for i in range(1, len(parts)):  # the packages above it, unless the importer is inside them
                    parent = ".".join(parts[:i])
                    if parent in known and not (module == parent or module.startswith(parent + ".")):
                        out.append((parent, line))
                return

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base, node.lineno)
    return out


def import_graph(files=None, extra=None):
    """{module: [(imported module, line)]}; `extra`: {module: source} added (for the self-checks)."""
    files = module_files() if files is None else files
    sources = {m: open(p, encoding="utf-8").read() for m, p in files.items()}
    sources.update(extra or {})
    known = set(sources)
    return {m: imports_of(m, src, known, is_package=files.get(m, "").endswith("__init__.py"))
            for m, src in sources.items()}


def cycles(graph, within="src"):
    """Import circles among the modules under `within` (each as a list of modules)."""
    nodes = sorted(m for m in graph if m == within or m.startswith(within + "."))
    edges = {m: sorted({t for t, _ in graph[m] if t in nodes and t != m}) for m in nodes}
    found, state = [], {}

    def visit(m, path):
        state[m] = "open"
        path.append(m)
        for t in edges[m]:
            if state.get(t) == "open":
                found.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path)
        path.pop()
        state[m] = "done"

    for m in nodes:
        if m not in state:
            visit(m, [])
    return found


def upward_imports(graph):
    bad = []
    for m, targets in graph.items():
        lm = layer_of(m)
        for t, line in targets:
            lt = layer_of(t)
            if lm is not None and lt is not None and lt > lm:
                bad.append(f"{m}:{line} imports {t} ({LAYERS[lm][0]} -> {LAYERS[lt][0]})")
    return bad


def private_imports(graph):
    bad = []
    for m, targets in graph.items():
        if m.split(".")[0] in SCRIPT_DIRS:
            bad += [f"{m}:{line} imports {t}" for t, line in targets
                    if (t == "src" or t.startswith("src.")) and t not in PUBLIC]
    return bad


# ----------------------------------------------------------------------------- the rules
def test_every_module_has_a_layer():
    assert [m for m in module_files() if layer_of(m) is None] == []


def test_no_import_circle_in_src():
    assert cycles(import_graph()) == []


def test_no_import_from_a_lower_layer_to_a_higher_one():
    assert upward_imports(import_graph()) == []


def test_bench_and_scripts_use_only_the_public_api():
    assert private_imports(import_graph()) == []


# ----------------------------------------------------------------------------- the checks can fail
def test_the_checks_detect_violations():
    files = module_files()
    graph = import_graph(files, extra={
        "src.utils": open(files["src.utils"]).read() + "\ndef f():\n    from .engine import evaluate\n",
        "bench.fake": "from src.quant.calibrate import calibrate_model\nimport bench_quant\n",
    })
    assert "src.utils:" in " ".join(upward_imports(graph)) and "base -> engine" in " ".join(upward_imports(graph))
    assert any(c[0] == "src.utils" or "src.utils" in c for c in cycles(graph))  # engine imports utils
    bad = private_imports({"bench.fake": graph["bench.fake"]})
    assert bad == ["bench.fake:1 imports src.quant.calibrate", "bench.fake:1 imports src.quant"]
    assert ("bench.bench_quant", 2) in graph["bench.fake"]  # a sibling script, found on bench/'s path
    # relative imports resolve inside their package; a package import names its __init__ as well
    graph = import_graph(files, extra={"src.quant.fake": "from ..export.onnx import export_onnx\n"})
    assert {t for t, _ in graph["src.quant.fake"]} == {"src.export.onnx", "src.export"}
    assert upward_imports({"src.quant.fake": graph["src.quant.fake"]})


@pytest.mark.parametrize("module", ["src.quant.vtptq_plus", "src.sharded", "bench.calib_speed"])
def test_the_graph_sees_imports_inside_functions(module):
    graph = import_graph()
    assert graph[module], f"no imports found in {module}"
