"""A strict fake ``tensorrt`` module, built from a recorded API surface (tests/data/tensorrt_api_*.json).

Strict: an attribute, enum member, method, keyword argument or argument count that the real
bindings of that version do not have raises, as the real module would (AttributeError /
TypeError); so does an argument of the wrong enum, or a non-int where an int is declared.
Behaviour: just enough of TensorRT to walk qcourse's build / load / run / report code —
``OnnxParser.parse`` reads the ONNX it is given (with onnx) so the network has its real
inputs and outputs, a "plan" is JSON describing it, an engine lists its I/O tensors in an
order other than ONNX's, and ``execute_async_v3`` fills output k (in ONNX order) with k + 1
at the address it was given. A recorded method that has no behaviour here raises
NotImplementedError, so the fake never answers silently.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import types
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data"
API_FILES = sorted(DATA.glob("tensorrt_api_*.json"))

INT_TYPES = ("int", "typing.SupportsInt")
BUFFER_TYPES = ("buffer", "typing_extensions.Buffer")


class FakeEnumValue:
    def __init__(self, enum: str, name: str, value: int):
        self.enum, self.name, self.value = enum, name, value

    def __int__(self):
        return self.value

    __index__ = __int__

    def __eq__(self, other):
        return isinstance(other, FakeEnumValue) and (self.enum, self.name) == (other.enum, other.name)

    def __hash__(self):
        return hash((self.enum, self.name))

    def __repr__(self):
        return f"<{self.enum}.{self.name}: {self.value}>"


def _type_ok(api, declared: str, value) -> bool:
    if declared in api["classes"] and "enum" in api["classes"][declared]:
        return isinstance(value, FakeEnumValue) and value.enum == declared
    if declared in INT_TYPES:
        return isinstance(value, (int, np.integer)) and not isinstance(value, FakeEnumValue)
    if declared == "str":
        return isinstance(value, str)
    if declared == "bool":
        return isinstance(value, (bool, np.bool_))
    if declared in BUFFER_TYPES:
        return isinstance(value, (bytes, bytearray, memoryview))
    if declared in ("tuple", "list"):
        return isinstance(value, {"tuple": tuple, "list": list}[declared])
    return True  # classes and the rest: not checked


def check_call(api, where: str, sigs, args, kwargs) -> None:
    """Raise TypeError unless (args, kwargs) fit one of the recorded overloads ``sigs``."""
    problems = []
    for sig in sigs:
        params = [p for p in sig["params"] if p[0] not in ("*", "/")]
        if len(args) > len(params):
            problems.append(f"{len(args)} positional arguments for {len(params)}")
            continue
        bound = dict(zip((p[0] for p in params), args))
        unknown = [k for k in kwargs if k not in {p[0] for p in params} or k in bound]
        if unknown:
            problems.append(f"unknown or repeated keyword {unknown}")
            continue
        bound.update(kwargs)
        missing = [p[0] for p in params if not p[2] and p[0] not in bound]
        wrong = [p[0] for p in params if p[0] in bound and not _type_ok(api, p[1], bound[p[0]])]
        if missing or wrong:
            problems.append(f"missing {missing}, wrong type {wrong}")
            continue
        return
    raise TypeError(f"tensorrt {api['version']}: {where}() got incompatible arguments {args} {kwargs}: "
                    f"{'; '.join(problems) or 'no signature recorded'}")


class FakeClass:
    """A recorded class: construct it (checked against ``__init__``), read its enum members,
    exported enum values, nested classes and static methods."""

    def __init__(self, fake, qualname: str):
        self._fake, self._qualname = fake, qualname
        self._rec = fake._api["classes"][qualname]

    def __repr__(self):
        return f"<fake tensorrt class {self._qualname}>"

    def __call__(self, *args, **kwargs):
        init = self._fake._lookup(self._qualname, "init")
        if init is None:
            raise TypeError(f"tensorrt {self._fake.__version__}: {self._qualname}: No constructor defined!")
        check_call(self._fake._api, f"{self._qualname}.__init__", init, args, kwargs)
        return self._fake._behave(self._qualname, "__init__", None, *args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        fake = self._fake
        if name in self._rec.get("enum", ()):
            return fake._enum_value(self._qualname, name)
        attr = fake._attr(self._qualname, name)
        if attr is None:
            raise AttributeError(f"tensorrt {fake.__version__}: {self._qualname} has no attribute {name!r}")
        if attr["kind"] == "enum_value":
            return fake._enum_value(attr["enum"], attr["value"])
        if attr["kind"] == "class":
            return FakeClass(fake, attr["name"])
        if attr["kind"] == "staticmethod":
            return lambda *a, **k: (check_call(fake._api, f"{self._qualname}.{name}", attr["sigs"], a, k),
                                    fake._behave(self._qualname, name, None, *a, **k))[1]
        raise AttributeError(f"{self._qualname}.{name} is an instance attribute ({attr['kind']})")


class FakeObject:
    """An instance of a recorded class: only its recorded methods and properties exist."""

    def __init__(self, fake, qualname: str, **state):
        object.__setattr__(self, "_fake", fake)
        object.__setattr__(self, "_qualname", qualname)
        object.__setattr__(self, "state", dict(state))

    def __repr__(self):
        return f"<fake tensorrt {self._qualname}>"

    def _find(self, name):
        attr = self._fake._attr(self._qualname, name)
        if attr is None:
            raise AttributeError(f"tensorrt {self._fake.__version__}: {self._qualname} has no attribute {name!r}")
        return attr

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        attr = self._find(name)
        fake = self._fake
        if attr["kind"] == "property":
            if name in self.state:
                return self.state[name]
            return fake._behave(self._qualname, name, self)
        if attr["kind"] in ("method", "staticmethod"):
            def method(*args, **kwargs):
                check_call(fake._api, f"{self._qualname}.{name}", attr["sigs"], args, kwargs)
                return fake._behave(self._qualname, name, self, *args, **kwargs)
            return method
        if attr["kind"] == "enum_value":
            return fake._enum_value(attr["enum"], attr["value"])
        raise AttributeError(f"{self._qualname}.{name}: {attr['kind']} not modelled")

    def __setattr__(self, name, value):
        attr = self._find(name)
        if attr["kind"] != "property" or attr["readonly"]:
            raise AttributeError(f"tensorrt {self._fake.__version__}: {self._qualname}.{name} is not writable")
        if name in self._fake._enum_properties and not _type_ok(self._fake._api, self._fake._enum_properties[name],
                                                                 value):
            raise TypeError(f"{self._qualname}.{name} takes a {self._fake._enum_properties[name]}, got {value!r}")
        self.state[name] = value

    def __bytes__(self):  # IHostMemory has the buffer protocol (not visible to introspection)
        if self._qualname != "IHostMemory":
            raise TypeError(f"{self._qualname} has no buffer")
        return self.state["data"]


class FakeTensorRT(types.ModuleType):
    """``tensorrt`` as recorded in ``api_file``, with the behaviour of :class:`World`."""

    def __init__(self, api_file: Path, world: "World", version: str = None):
        super().__init__("tensorrt")
        api = json.loads(Path(api_file).read_text())
        self.__dict__.update(_api=api, _world=world, __version__=version or api["version"], _enum_numbers={})
        #: properties qcourse sets whose real setter takes an enum
        self.__dict__["_enum_properties"] = {"profiling_verbosity": "ProfilingVerbosity"}

    def __getattr__(self, name):
        api = self.__dict__["_api"]
        if name.startswith("__"):
            raise AttributeError(name)
        if name in api["names"]:
            if name in api["classes"]:
                return FakeClass(self, name)
            if name in api["functions"]:
                sigs = api["functions"][name]
                return lambda *a, **k: (check_call(api, name, sigs, a, k), self._behave("", name, None, *a, **k))[1]
            value = api["values"].get(name)
            if value and value["kind"] == "enum_value":
                return self._enum_value(value["enum"], value["value"])
            if value and value["kind"] == "class":
                return FakeClass(self, value["name"])
        raise AttributeError(f"tensorrt {self.__version__} has no attribute {name!r}")

    # the recorded API
    def _attr(self, qualname: str, name: str):
        todo = [qualname]
        while todo:
            rec = self._api["classes"].get(todo.pop(0))
            if rec is None:
                continue
            if name in rec["attrs"]:
                return rec["attrs"][name]
            todo += rec["bases"]
        return None

    def _lookup(self, qualname: str, what: str):
        todo = [qualname]
        while todo:
            rec = self._api["classes"].get(todo.pop(0))
            if rec is None:
                continue
            if what in rec:
                return rec[what]
            todo += rec["bases"]
        return None

    def _enum_value(self, enum: str, name: str) -> FakeEnumValue:
        members = self._api["classes"][enum]["enum"]
        if name not in members:
            raise AttributeError(f"tensorrt {self.__version__}: {enum} has no member {name!r}")
        return FakeEnumValue(enum, name, members.index(name))

    def _behave(self, qualname: str, name: str, obj, *args, **kwargs):
        key = name.strip("_")  # "__init__" -> "init"
        fn = getattr(self._world, f"{qualname.replace('.', '_')}__{key}".lstrip("_"), None)
        if fn is None and obj is not None:  # behaviour defined on a base class
            todo = list(self._api["classes"][qualname]["bases"])
            while todo and fn is None:
                base = todo.pop(0)
                fn = getattr(self._world, f"{base}__{key}", None)
                todo += self._api["classes"].get(base, {}).get("bases", [])
        if fn is None:
            raise NotImplementedError(f"the fake has no behaviour for {qualname}.{name}")
        return fn(obj, *args, **kwargs) if obj is not None else fn(*args, **kwargs)


class World:
    """The behaviour of the fake, and what the code under test did to it."""

    def __init__(self, inspector_json: str = '{"Layers": []}'):
        self.trt = None  # set by install()
        self.inspector_json = inspector_json
        self.active_devices = []  # CUDA devices current while a Builder / Runtime was made
        self.builder_fails = False
        self.reject_cache = False
        self.parsed = None
        self.flags_cleared, self.flags_set = [], []
        self.network_flags = None
        self.executions = []
        self.device_stack = []

    def obj(self, qualname, **state):
        return FakeObject(self.trt, qualname, **state)

    # builder side
    def Logger__init(self, min_severity=None):
        return self.obj("Logger", min_severity=min_severity)

    def Builder__init(self, logger):
        if self.builder_fails:  # what pybind raises when createInferBuilder returns NULL
            raise TypeError("pybind11::init(): factory function returned nullptr")
        self.active_devices.append(("builder", self.device_stack[-1] if self.device_stack else None))
        return self.obj("Builder")

    def Builder__create_network(self, builder, flags=0):
        self.network_flags = int(flags)
        return self.obj("INetworkDefinition", inputs=[], outputs=[])

    def Builder__create_optimization_profile(self, builder):
        return self.obj("IOptimizationProfile", shapes={})

    def IOptimizationProfile__set_shape(self, profile, input, min, opt, max):
        profile.state["shapes"][input] = (tuple(min), tuple(opt), tuple(max))

    def Builder__create_builder_config(self, builder):
        return self.obj("IBuilderConfig", flags={"TF32"}, pools={}, profiles=[], cache=None)

    def IBuilderConfig__set_memory_pool_limit(self, config, pool, pool_size):
        config.state["pools"][pool.name] = pool_size

    def IBuilderConfig__clear_flag(self, config, flag):
        self.flags_cleared.append(flag.name)
        config.state["flags"].discard(flag.name)

    def IBuilderConfig__set_flag(self, config, flag):
        self.flags_set.append(flag.name)
        config.state["flags"].add(flag.name)

    def IBuilderConfig__create_timing_cache(self, config, serialized_timing_cache):
        blob = bytes(serialized_timing_cache)
        if blob and not blob.startswith(b"cache:"):
            return None  # a blob TensorRT cannot read
        return self.obj("ITimingCache", blob=blob or b"cache:")

    def IBuilderConfig__set_timing_cache(self, config, cache, ignore_mismatch):
        if self.reject_cache and cache.state["blob"] != b"cache:":
            return False
        config.state["cache"] = cache
        return True

    def IBuilderConfig__get_timing_cache(self, config):
        return config.state["cache"]

    def ITimingCache__serialize(self, cache):
        return self.obj("IHostMemory", data=cache.state["blob"] + b"+timed")

    def IBuilderConfig__add_optimization_profile(self, config, profile):
        config.state["profiles"].append(profile)
        return len(config.state["profiles"]) - 1

    def OnnxParser__init(self, network, logger):
        return self.obj("OnnxParser", network=network)

    def OnnxParser__parse(self, parser, model, path=None):
        import onnx

        import onnxruntime as ort

        m = self.parsed = onnx.load_from_string(bytes(model))

        def dims(v):
            return tuple(d.dim_value if d.dim_value > 0 else -1 for d in v.type.tensor_type.shape.dim)

        net = parser.state["network"]
        net.state["inputs"] = [self.obj("ITensor", name=v.name, shape=dims(v)) for v in m.graph.input]
        # the output shapes TensorRT would infer, from ONNX Runtime on one zero image
        inp = m.graph.input[0]
        one = np.zeros([max(d, 1) for d in dims(inp)], np.float32)
        outs = ort.InferenceSession(bytes(model), providers=["CPUExecutionProvider"]).run(None, {inp.name: one})
        net.state["outputs"] = [(v.name, (-1, *o.shape[1:]), v.type.tensor_type.elem_type)
                                for v, o in zip(m.graph.output, outs)]
        return True

    def INetworkDefinition__num_inputs(self, net):
        return len(net.state["inputs"])

    def INetworkDefinition__get_input(self, net, index):
        return net.state["inputs"][index]

    def Builder__build_serialized_network(self, builder, network, config):
        inp = network.state["inputs"][0]
        plan = {"input": inp.name, "outputs": network.state["outputs"], "flags": sorted(config.state["flags"]),
                "shapes": config.state["profiles"][0].state["shapes"][inp.name]}
        return self.obj("IHostMemory", data=json.dumps(plan).encode())

    # runtime side
    def Runtime__init(self, logger):
        self.active_devices.append(("runtime", self.device_stack[-1] if self.device_stack else None))
        return self.obj("Runtime")

    def Runtime__deserialize_cuda_engine(self, runtime, serialized_engine):
        plan = json.loads(bytes(serialized_engine))
        names = [o[0] for o in plan["outputs"]][::-1] + [plan["input"]]  # not ONNX's order
        return self.obj("ICudaEngine", plan=plan, names=names)

    def ICudaEngine__num_io_tensors(self, engine):
        return len(engine.state["names"])

    def ICudaEngine__get_tensor_name(self, engine, index):
        return engine.state["names"][index]

    def ICudaEngine__get_tensor_mode(self, engine, name):
        return self.trt.TensorIOMode.INPUT if name == engine.state["plan"]["input"] else self.trt.TensorIOMode.OUTPUT

    def ICudaEngine__get_tensor_dtype(self, engine, name):
        return self.trt.DataType.FLOAT  # the engines here take and return float32

    def nptype(self, trt_type):
        return {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32}[trt_type.name]

    def ICudaEngine__create_execution_context(self, engine, *args, **kwargs):
        return self.obj("IExecutionContext", engine=engine, shapes={}, addresses={})

    def IExecutionContext__set_input_shape(self, ctx, name, shape):
        ctx.state["shapes"][name] = tuple(shape)
        return True

    def IExecutionContext__get_tensor_shape(self, ctx, name):
        plan = ctx.state["engine"].state["plan"]
        batch = ctx.state["shapes"][plan["input"]][0]
        dims = next(d for n, d, _ in plan["outputs"] if n == name)
        return (batch, *dims[1:])

    def IExecutionContext__set_tensor_address(self, ctx, name, memory):
        ctx.state["addresses"][name] = memory
        return True

    def IExecutionContext__execute_async_v3(self, ctx, stream_handle):
        plan = ctx.state["engine"].state["plan"]
        self.executions.append({"stream": stream_handle, "addresses": dict(ctx.state["addresses"])})
        for k, (name, _, _) in enumerate(plan["outputs"]):
            shape = self.IExecutionContext__get_tensor_shape(ctx, name)
            fill = np.full(shape, k + 1, np.float32)
            ctypes.memmove(ctx.state["addresses"][name], fill.ctypes.data, fill.nbytes)
        return True

    def ICudaEngine__create_engine_inspector(self, engine):
        return self.obj("EngineInspector")

    def EngineInspector__get_engine_information(self, inspector, format):
        assert inspector.state.get("execution_context") is not None
        return self.inspector_json


class CpuDevice:
    """Stands in for qcourse.engines.trt._CudaDevice: same interface, CPU memory (torch tensors,
    whose addresses the fake engine writes to), and it tells ``World`` which device is current."""

    def __init__(self, world: World, device=None):
        self.world = world
        dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device or "cuda")
        assert dev.type == "cuda", f"the backend passed a non-CUDA device {device!r}"
        self.index = dev.index or 0
        self.name = "Fake GPU"
        self.stream_handle = 0x5EED  # a stream of its own, not the legacy default (0)

    def __str__(self):
        return f"cuda:{self.index} ({self.name})"

    @contextlib.contextmanager
    def active(self, stream: bool = False):
        self.world.device_stack.append(self.index)
        try:
            yield
        finally:
            self.world.device_stack.pop()

    def upload(self, x):
        return torch.from_numpy(np.array(x, copy=True))

    def empty(self, shape, dtype):
        return torch.from_numpy(np.zeros(shape, dtype))

    @staticmethod
    def address(buffer):
        return int(buffer.data_ptr())

    def synchronize(self):
        pass

    @staticmethod
    def download(buffer):
        return buffer.numpy().copy()


def install(monkeypatch, api_file: Path, version: str = None, inspector_json: str = '{"Layers": []}'):
    """Make ``import tensorrt`` give the fake of ``api_file`` and the backend use CPU memory."""
    import sys

    from qcourse.engines import trt as backend

    world = World(inspector_json)
    fake = FakeTensorRT(api_file, world, version)
    world.trt = fake
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(backend, "_CudaDevice", lambda device=None: CpuDevice(world, device))
    return fake, world
