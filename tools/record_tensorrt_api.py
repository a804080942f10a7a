"""Record the Python API surface of TensorRT's bindings into tests/data/tensorrt_api_<version>.json.

The TensorRT backend (``qcourse/engines/trt.py``) cannot run without an NVIDIA GPU, so the
test suite checks its calls against a strict fake ``tensorrt`` module built from these
records (``tests/test_engines_trt.py``): a method, enum member or keyword argument that the
real bindings do not have fails the test on any machine.

A one-off tool, run by hand when a TensorRT version is added; the JSON files are the
committed artefact. For each version it:

1. downloads the ``tensorrt-cu12-bindings`` wheel from PyPI (``pip download --no-deps``),
   and unpacks it into a temporary folder (nothing is installed);
2. compiles, with ``gcc``, stub ``libnvinfer`` / ``libnvinfer_plugin`` / ``libnvonnxparser``
   shared libraries that export the few C entry points the bindings look up when they are
   imported (every factory returns NULL: nothing can be built, everything can be inspected);
3. imports the bindings in a child process with the stubs on ``LD_LIBRARY_PATH`` and writes,
   for every class, its bases, enum members, properties (read-only or not), methods and
   static methods with their signatures parsed from pybind11's docstrings, and for every
   module-level function its signatures.

Usage::

    python tools/record_tensorrt_api.py 10.0.1 10.16.1.11 11.0.0.114 11.4.0.106

(``pip index versions tensorrt-cu12-bindings`` lists the published versions.)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "tests" / "data"

#: the C symbols the bindings' extension module resolves from TensorRT's libraries at import
STUB_C = r"""
#include <stddef.h>
void *createInferBuilder_INTERNAL(void *logger, int version) { return NULL; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return NULL; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return NULL; }
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return NULL; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return NULL; }
int getNvOnnxParserVersion(void) { return 0; }
void *getPluginRegistry(void) { return NULL; }
void *getBuilderPluginRegistry(int type) { return NULL; }
int initLibNvInferPlugins(void *logger, const char *ns) { return 1; }
"""
STUB_LIBS = ("nvinfer", "nvinfer_plugin", "nvonnxparser")
#: the special methods worth recording (indexing, iteration, ``with``)
DUNDERS = ("__getitem__", "__len__", "__iter__", "__enter__", "__exit__")


# ------------------------------------------------------------------ run in the child process
def _split_top(text: str, sep: str = ",") -> list:
    """Split ``text`` on ``sep`` outside brackets ((), [], {}, <>)."""
    parts, depth, cur = [], 0, ""
    for i, ch in enumerate(text):
        if ch in "([{<" and not (ch == "<" and text[i - 1:i] == " " and text[i + 1:i + 2] == " "):
            depth += 1
        elif ch in ")]}>" and not (ch == ">" and text[i - 1:i] == "-") and depth > 0:
            depth -= 1
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur)
    return [p.strip() for p in parts]


def _strip_module(text: str) -> str:
    return text.replace("tensorrt_bindings.tensorrt.", "").replace("tensorrt_bindings.", "")


def parse_signatures(name: str, doc: str) -> list:
    """pybind11's ``name(self: T, a: int, b: bool = True) -> R`` lines as
    ``[{"params": [[name, type, has_default], ...], "returns": R}]``, one per overload."""
    sigs = []
    for line in (doc or "").splitlines():
        m = re.match(r"^\s*(?:\d+\.\s+)?" + re.escape(name) + r"\((.*)\)\s*->\s*(.+?)\s*$", line)
        if not m:
            continue
        params = []
        for part in _split_top(m.group(1)):
            if part in ("*", "/"):
                params.append([part, "", False])
                continue
            head, has_default = (part.split(" = ", 1)[0], True) if " = " in part else (part, False)
            pname, _, ptype = head.partition(": ")
            params.append([pname.strip(), _strip_module(ptype.strip()), has_default])
        if params and params[0][0] == "self":
            params = params[1:]
        sigs.append({"params": params, "returns": _strip_module(m.group(2))})
    return sigs


def _describe_class(cls, base_object) -> dict:
    import inspect

    rec = {"bases": [b.__name__ for b in cls.__bases__ if b is not object and b is not base_object]}
    if hasattr(cls, "__members__"):
        rec["enum"] = sorted(cls.__members__)
    init = cls.__dict__.get("__init__")
    if init is not None:  # pybind11 gives a class without a constructor object's __init__ doc
        rec["init"] = None if (init.__doc__ or "").startswith("Initialize self.") else \
            parse_signatures("__init__", init.__doc__)
    attrs = {}
    for name, value in sorted(cls.__dict__.items()):
        if (name.startswith("_") and name not in DUNDERS) or name in rec.get("enum", ()):
            continue
        static = inspect.getattr_static(cls, name)
        if isinstance(static, property):
            attrs[name] = {"kind": "property", "readonly": static.fset is None}
        elif isinstance(static, staticmethod):
            attrs[name] = {"kind": "staticmethod", "sigs": parse_signatures(name, getattr(cls, name).__doc__)}
        elif isinstance(value, type):
            attrs[name] = {"kind": "class", "name": value.__qualname__}
        elif callable(value):
            attrs[name] = {"kind": "method", "sigs": parse_signatures(name, value.__doc__)}
        elif hasattr(type(value), "__members__"):  # an enum member exported into the class
            attrs[name] = {"kind": "enum_value", "enum": type(value).__qualname__, "value": value.name}
        else:
            attrs[name] = {"kind": "value", "type": type(value).__name__}
    rec["attrs"] = attrs
    return rec


def python_signature(fn) -> dict:
    """A Python function's signature in :func:`parse_signatures`' form."""
    import inspect

    params = [[p.name, "" if p.annotation is p.empty else str(p.annotation), p.default is not p.empty]
              for p in inspect.signature(fn).parameters.values()]
    return {"params": params, "returns": ""}


def introspect() -> dict:
    """The API record of the ``tensorrt_bindings`` module importable here."""
    import inspect

    import tensorrt_bindings as trt

    base_object = next((b for b in trt.Logger.__mro__ if b.__name__ == "pybind11_object"), object)
    classes, functions, values = {}, {}, {}
    todo = [(name, getattr(trt, name)) for name in dir(trt) if not name.startswith("_")]
    seen = set()
    while todo:
        name, value = todo.pop()
        if isinstance(value, type):
            key = value.__qualname__
            if not value.__module__.startswith("tensorrt"):
                continue
            if name != key and "." not in name:  # a module-level alias of a nested class
                values[name] = {"kind": "class", "name": key}
            if key in seen:
                continue
            seen.add(key)
            classes[key] = _describe_class(value, base_object)
            for attr, sub in value.__dict__.items():
                if isinstance(sub, type) and not attr.startswith("__"):
                    todo.append((sub.__qualname__, sub))
        elif inspect.isfunction(value):  # Python code of the package's __init__
            functions[name] = [python_signature(value)]
        elif callable(value):
            functions[name] = parse_signatures(name, value.__doc__)
        elif "." not in name:
            kind = type(value).__qualname__
            values[name] = ({"kind": "enum_value", "enum": kind, "value": value.name}
                            if hasattr(type(value), "__members__") else {"kind": "value", "type": kind})
    module_names = sorted(n for n in dir(trt) if not n.startswith("_"))
    return {"module": "tensorrt", "version": trt.__version__, "names": module_names, "classes": classes,
            "functions": functions, "values": values}


# ------------------------------------------------------------------ the parent process
def record(version: str, work: Path) -> dict:
    major = version.split(".")[0]
    wheels = work / f"wheel-{version}"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d",
                    str(wheels), f"tensorrt-cu12-bindings=={version}"], check=True)
    wheel = next(wheels.glob("*.whl"))
    site = work / f"site-{version}"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    libs = work / f"lib-{major}"
    if not libs.is_dir():
        libs.mkdir()
        src = libs / "stub.c"
        src.write_text(STUB_C)
        for lib in STUB_LIBS:
            subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(libs / f"lib{lib}.so.{major}"), str(src)],
                           check=True)
    env = dict(os.environ, LD_LIBRARY_PATH=str(libs), PYTHONPATH=f"{site}{os.pathsep}{Path(__file__).parent}")
    child = subprocess.run([sys.executable, "-c", "import json, record_tensorrt_api as r; "
                            "print(json.dumps(r.introspect()))"], env=env, check=True, capture_output=True,
                           text=True)
    api = json.loads(child.stdout)
    if api["version"] != version:
        raise SystemExit(f"the wheel for {version} reports version {api['version']}")
    api["source"] = f"tensorrt-cu12-bindings {version} wheel from PyPI ({wheel.name}), introspected"
    return api


def dump(api: dict) -> str:
    """JSON with one line per class / function / value: small, and a new version diffs by line."""
    lines = ["{"]
    keys = sorted(api)
    for i, key in enumerate(keys):
        value = api[key]
        end = "," if i < len(keys) - 1 else ""
        if isinstance(value, dict) and value:
            items = sorted(value.items())
            lines.append(f"{json.dumps(key)}: {{")
            lines += [f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}{',' if j < len(items) - 1 else ''}"
                      for j, (k, v) in enumerate(items)]
            lines.append("}" + end)
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, sort_keys=True)}{end}")
    return "\n".join(lines + ["}"]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="+", help="tensorrt-cu12-bindings versions, e.g. 10.16.1.11 11.4.0.106")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder of the JSON files (default: tests/data)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for version in args.versions:
            api = record(version, Path(tmp))
            path = args.out / f"tensorrt_api_{version}.json"
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(dump(api))
            print(f"wrote {path}: {len(api['classes'])} classes, {len(api['functions'])} functions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
