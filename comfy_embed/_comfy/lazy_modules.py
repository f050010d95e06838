"""Deferred imports for boot: modules ComfyUI imports at start-up but an
SD1.5 run never uses, loaded when first used instead.

ComfyUI's ``nodes`` imports ``scipy.stats`` (only the beta scheduler uses
it), ``comfy.sd`` imports Stable Cascade's coder and with it ``torchvision``
(whose ``ops`` import ``torch._dynamo``, sympy and triton: over a second),
and the extra nodes import kornia, av and spandrel. ComfyUI's files stay as
they are: before they are imported, :func:`install` puts stand-ins into
``sys.modules`` that import the real module the first time anything looks
inside them, after which everything goes to the real one.

- ``import x.y`` and ``from x import y`` get the stand-in (or a stand-in
  attribute), so importing costs nothing;
- the first real use (an attribute value, a call, ``isinstance``,
  subclassing, a dunder such as ``__version__`` or ``__path__``) imports the
  real module and answers from it; names a stand-in handed out before that
  keep forwarding to the real objects;
- a module that is not installed gets no stand-in, so optional imports fail
  as they always did.

Only this process's boot uses it, and only for the modules in
:data:`DEFERRED`; ``COMFY_EMBED_LAZY_IMPORTS=0`` turns it off.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
from typing import Any

__all__ = ["DEFERRED", "install", "LazyModule", "loaded"]

#: Families of modules to defer: the top-level module (checked to be
#: installed) and the submodules that ComfyUI imports by name.
DEFERRED: dict[str, tuple[str, ...]] = {
    "torchvision": ("torchvision", "torchvision.transforms"),
    "scipy": ("scipy.stats", "scipy.integrate", "scipy.ndimage"),
    "kornia": ("kornia", "kornia.filters", "kornia.morphology", "kornia.color"),
    "av": ("av", "av.container", "av.subtitles", "av.subtitles.stream"),
    "spandrel": ("spandrel",),
}

_lock = threading.RLock()
#: Attributes an unloaded stand-in does not have (asking does not load it).
_NOT_YET = frozenset({"__file__", "__cached__", "__builtins__", "__wrapped__", "__origin__",
                      "__getstate__", "__reduce_ex__", "__reduce__"})
#: Submodules that importlib is about to load under a stand-in parent which
#: has meanwhile loaded for real (and may have imported them itself).
_reuse: set[str] = set()


class _ReuseLoader(importlib.abc.Loader):
    """Hands back a module that is already in ``sys.modules`` instead of
    executing it a second time (see ``LazyModule.__getattr__``)."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module = module
        self.spec = getattr(module, "__spec__", None)

    def create_module(self, spec: Any) -> types.ModuleType:
        return self.module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self.spec  # importlib just set ours


class _ReuseFinder:
    """First on ``sys.meta_path``; answers only for names in ``_reuse``."""

    @staticmethod
    def find_spec(name: str, path: Any = None, target: Any = None) -> Any:
        # Every import of the process passes here: no lock (a thread waiting
        # for one while holding a module's import lock could deadlock); set
        # operations are atomic.
        if name not in _reuse:
            return None
        _reuse.discard(name)
        module = sys.modules.get(name)
        if module is None:
            return None  # the real package did not import it: load it normally
        return importlib.machinery.ModuleSpec(name, _ReuseLoader(module))


class _LazyAttr:
    """A name taken from a stand-in before its module was imported (``from x
    import y``): forwards calls, attributes, ``isinstance`` and subclassing
    to the real object."""

    __slots__ = ("_lazy_module", "_lazy_name")

    def __init__(self, module: "LazyModule", name: str) -> None:
        object.__setattr__(self, "_lazy_module", module)
        object.__setattr__(self, "_lazy_name", name)

    def _target(self) -> Any:
        return getattr(self._lazy_module._lazy_load(), self._lazy_name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._target()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target(), name, value)

    def __instancecheck__(self, obj: Any) -> bool:
        return isinstance(obj, self._target())

    def __subclasscheck__(self, cls: Any) -> bool:
        return issubclass(cls, self._target())

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[Any, ...]:
        return (self._target(),)

    def __getitem__(self, key: Any) -> Any:
        return self._target()[key]

    def __iter__(self) -> Any:
        return iter(self._target())

    def __bool__(self) -> bool:
        return bool(self._target())

    def __eq__(self, other: Any) -> bool:
        return bool(self._target() == other)

    def __hash__(self) -> int:
        return hash(self._target())

    def __repr__(self) -> str:
        return f"<deferred {self._lazy_module.__name__}.{self._lazy_name}>"


class LazyModule(types.ModuleType):
    """Stands in for module ``name`` until it is used (see the module doc)."""

    def __init__(self, name: str, family: tuple[str, ...], spec: Any) -> None:
        super().__init__(name)
        self.__dict__["_lazy_family"] = family
        self.__dict__["_lazy_real"] = None
        self.__spec__ = spec
        self.__loader__ = None

    def _lazy_load(self) -> types.ModuleType:
        real = self.__dict__["_lazy_real"]
        if real is not None:
            return real
        with _lock:
            # Every stand-in of the family leaves sys.modules first, so the
            # real package's own imports of its submodules are real.
            for other in self.__dict__["_lazy_family"]:
                if isinstance(sys.modules.get(other), LazyModule):
                    del sys.modules[other]
        # Outside the lock: the import system's per-module locks make a second
        # thread wait for (and share) the first one's import.
        real = importlib.import_module(self.__name__)
        self.__dict__["_lazy_real"] = real
        return real

    def __getattr__(self, name: str) -> Any:
        real = self.__dict__["_lazy_real"]
        if real is None and name == "__path__":
            caller = sys._getframe(1)
            if caller.f_code.co_name != "_find_and_load_unlocked":
                # ``from x.y import z`` asks whether x.y is a package before
                # taking z: not yet, so z comes from __getattr__, lazily.
                raise AttributeError(name)
            # A submodule with no stand-in is being imported: the real package
            # first, and if loading it imported that submodule, that one.
            child = caller.f_locals.get("name")
            path = self._lazy_load().__path__
            if isinstance(child, str):
                _reuse.add(child)
            return path
        if real is None and name in _NOT_YET:
            # Introspection (inspect.getmodule scans every module's __file__)
            # must not load everything it passes.
            raise AttributeError(name)
        if real is not None or name.startswith("_"):
            return getattr(self._lazy_load(), name)
        sub = f"{self.__name__}.{name}"
        if isinstance(sys.modules.get(sub), LazyModule):
            return sys.modules[sub]
        return _LazyAttr(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # The import system records submodules on their parent: keep those
        # here; anything else belongs to the real module.
        if name.startswith("__") or isinstance(value, types.ModuleType):
            super().__setattr__(name, value)
        else:
            setattr(self._lazy_load(), name, value)

    def __dir__(self) -> list[str]:
        return dir(self._lazy_load())

    def __repr__(self) -> str:
        state = "loaded" if self.__dict__["_lazy_real"] is not None else "deferred"
        return f"<module {self.__name__!r} ({state})>"


def install(families: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """Put stand-ins for the deferred modules into ``sys.modules``; return
    the names installed. Modules already imported, or not installed, are
    left alone."""
    installed: list[str] = []
    with _lock:
        if not any(isinstance(f, _ReuseFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _ReuseFinder())
        for top, names in (DEFERRED if families is None else families).items():
            try:
                if importlib.util.find_spec(top) is None:
                    continue
            except (ImportError, ValueError):
                continue
            for name in names:
                if name in sys.modules:
                    continue
                spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
                sys.modules[name] = LazyModule(name, names, spec)
                installed.append(name)
    return installed


def loaded(name: str) -> bool:
    """Whether ``name`` is really imported (not a stand-in, or one that loaded)."""
    module = sys.modules.get(name)
    if isinstance(module, LazyModule):
        return module.__dict__["_lazy_real"] is not None
    return module is not None
