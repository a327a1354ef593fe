"""Small registries of plugins, filled by decorators and by Python entry points.

A plugin reaches lightfed in one of three ways:

1. ``@STRATEGIES.register()`` on the class, in a module that gets imported;
2. an entry point in its package's metadata, group ``lightfed.strategies`` (or ``lightfed.privacy``,
   ``lightfed.secure_aggregation``, ``lightfed.executors``, ``lightfed.audits``), whose value is a module
   or a class; loading it is enough, the decorator inside does the registration (a class that is not yet
   registered is registered under its own name);
3. a dotted ``class_path`` in a YAML config, which jsonargparse imports directly.

lightfed's own zoo (``plugins/lightfed_zoo``) takes route 2, exactly as a third-party package does.

An entry point that fails to import is remembered (:class:`FailedEntryPoint`): selecting a name it could
provide then reports the import error instead of "unknown strategy".
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    cls: type
    description: str
    origin: str


@dataclass(frozen=True)
class FailedEntryPoint:
    """An installed entry point whose ``load()`` raised: what it is, where it comes from, and the error."""

    name: str
    value: str
    group: str
    distribution: str | None
    error: BaseException

    def describe(self) -> str:
        """``entry point <name> = <value> of <distribution> <version>``."""
        where = f" of {self.distribution}" if self.distribution else ""
        return f"entry point {self.name} = {self.value}{where}"

    def error_text(self) -> str:
        return f"{type(self.error).__name__}: {self.error}"

    def could_provide(self, name: str) -> bool:
        """Whether ``name`` is this entry point's name, the class it names, or the last part of its module."""
        module, _, attr = self.value.partition(":")
        candidates = {self.name, attr.strip().split(".")[-1], module.strip().split(".")[-1]}
        return name.lower() in {c.lower() for c in candidates if c}


class Registry(Generic[T]):
    """A name -> class mapping with entry-point discovery.

    Names are matched case-insensitively, so ``fedprox``, ``FedProx`` and ``FEDPROX`` select the same
    class; registering a second class under an existing name raises unless ``override=True``.
    """

    def __init__(self, kind: str, group: str) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, RegistryEntry] = {}
        self._failed: dict[str, FailedEntryPoint] = {}
        self._loaded_entry_points = False

    def register(
        self, name: str | None = None, *, description: str | None = None, override: bool = False
    ) -> Callable[[T], T]:
        """Class decorator: register under ``name`` (default: the class name)."""

        def decorator(cls: T) -> T:
            self.add(cls, name=name, description=description, override=override)
            return cls

        return decorator

    def add(
        self,
        cls: type,
        name: str | None = None,
        description: str | None = None,
        override: bool = False,
        origin: str | None = None,
    ) -> None:
        """Register ``cls`` (the non-decorator form)."""
        key = (name or cls.__name__).lower()
        existing = self._entries.get(key)
        if existing is not None and existing.cls is not cls and not override:
            raise ValueError(
                f"{self.kind} name {key!r} is already registered by {existing.cls.__module__}."
                f"{existing.cls.__qualname__}; pass override=True to replace it."
            )
        doc = inspect.getdoc(cls) or ""
        self._entries[key] = RegistryEntry(
            name=name or cls.__name__,
            cls=cls,
            description=description or (doc.splitlines()[0] if doc else ""),
            origin=origin or cls.__module__,
        )

    def load_entry_points(self, force: bool = False) -> None:
        """Import every entry point of :attr:`group` once (idempotent).

        Args:
            force: Scan the installed distributions again even if this already ran (after a plugin was
                installed, or a ``*.dist-info`` directory put on ``sys.path``, in the same process).
                Entry points loaded before are loaded again, which is a no-op for imported modules.
        """
        if self._loaded_entry_points and not force:
            return
        self._loaded_entry_points = True
        if force:
            importlib.invalidate_caches()
        self._failed = {}
        for ep in importlib.metadata.entry_points(group=self.group):
            before = set(self._entries)
            dist = ep.dist
            try:
                obj = ep.load()
            except Exception as err:  # noqa: BLE001 - one broken plugin must not break the others
                failed = FailedEntryPoint(
                    ep.name, ep.value, self.group, None if dist is None else f"{dist.name} {dist.version}", err
                )
                self._failed[ep.name.lower()] = failed
                warnings.warn(
                    f"could not load {self.kind} plugin {ep.name!r} ({failed.describe()}): {failed.error_text()}",
                    RuntimeWarning, stacklevel=2,
                )
                continue
            if inspect.isclass(obj) and not any(e.cls is obj for e in self._entries.values()):
                self.add(obj, name=ep.name, origin=f"entry point {ep.value}")
            where = f"{dist.name} (entry point {ep.name})" if dist is not None else f"entry point {ep.name}"
            for key, entry in list(self._entries.items()):
                if key not in before or _defined_under(entry.cls, obj):
                    if not entry.origin.startswith(where):
                        self._entries[key] = RegistryEntry(entry.name, entry.cls, entry.description, where)

    def remove(self, name: str) -> RegistryEntry:
        """Unregister ``name`` and return its entry (tests restore it with :meth:`add`).

        Raises:
            KeyError: if nothing is registered as ``name``.
        """
        key = name.lower()
        if key not in self._entries:
            raise KeyError(f"no {self.kind} registered as {name!r}; registered: {', '.join(self.names()) or '(none)'}.")
        return self._entries.pop(key)

    def get(self, name: str) -> type:
        """The class registered as ``name``.

        Raises:
            KeyError: if there is none: naming the installed plugin that could provide ``name`` and its
                import error, if one failed to import, else listing the known names (and every plugin of
                :attr:`group` that failed to import).
        """
        self.load_entry_points()
        entry = self._entries.get(name.lower())
        if entry is not None:
            return entry.cls
        failed = self._failed.get(name.lower()) or next((f for f in self._failed.values() if f.could_provide(name)), None)
        if failed is not None:
            raise KeyError(
                f"{self.kind} {name!r} is installed ({failed.describe()}) but failed to import: "
                f"{failed.error_text()}. Fix that package's environment (install what it imports) or reinstall it."
            ) from failed.error
        broken = "".join(
            f" Installed but failed to import: {f.name} ({f.describe()}): {f.error_text()}." for f in self.failed()
        )
        close = difflib.get_close_matches(name.lower(), list(self._entries), n=1)
        hint = f" Did you mean {self._entries[close[0]].name!r}?" if close else ""
        raise KeyError(
            f"unknown {self.kind} {name!r}; registered: {', '.join(self.names()) or '(none)'}.{hint} "
            f"Use one of these names, or a dotted class_path to your own class.{broken}"
        )

    def failed(self) -> list[FailedEntryPoint]:
        """The entry points of :attr:`group` that failed to import, by name."""
        self.load_entry_points()
        return sorted(self._failed.values(), key=lambda f: f.name.lower())

    def create(self, name: str, **kwargs: Any) -> Any:
        """Instantiate the class registered as ``name``."""
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        self.load_entry_points()
        return sorted(e.name for e in self._entries.values())

    def entries(self) -> list[RegistryEntry]:
        self.load_entry_points()
        return sorted(self._entries.values(), key=lambda e: e.name.lower())

    def __contains__(self, name: str) -> bool:
        self.load_entry_points()
        return name.lower() in self._entries


def _defined_under(cls: type, obj: Any) -> bool:
    """Whether ``cls`` is defined in the module of entry-point object ``obj`` or, for a package, below it."""
    module = cls.__module__
    if module == getattr(obj, "__module__", None):
        return True
    package = getattr(obj, "__name__", None) if inspect.ismodule(obj) else None
    return package is not None and (module == package or module.startswith(package + "."))


STRATEGIES: Registry = Registry("strategy", "lightfed.strategies")
PRIVACY: Registry = Registry("privacy mechanism", "lightfed.privacy")
SECURE_AGGREGATION: Registry = Registry("secure aggregation protocol", "lightfed.secure_aggregation")
EXECUTORS: Registry = Registry("executor", "lightfed.executors")
#: Empirical privacy audits and attacks (:mod:`lightfed.audit`): callbacks that measure what a run leaks.
AUDITS: Registry = Registry("audit", "lightfed.audits")

#: The top-level config sections that hold a plugin (a registered name or class_path / init_args).
PLUGIN_SECTIONS = ("strategy", "privacy", "secure_aggregation")


def load_all_plugins() -> None:
    """Import every installed plugin, so jsonargparse can resolve their class names too."""
    for registry in (STRATEGIES, PRIVACY, SECURE_AGGREGATION, EXECUTORS, AUDITS):
        registry.load_entry_points()
