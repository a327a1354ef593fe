"""A plugin that is installed but fails to import is reported as such when selected, not as an unknown name."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

from lightfed.registry import Registry

GROUP = "lightfed.tests_broken_plugins"


def install(site: Path, monkeypatch: pytest.MonkeyPatch, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    """What ``pip install`` of a package ``brokenfed`` 1.2 leaves behind: its modules and its dist-info."""
    for name, source in modules.items():
        path = site / (name.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    dist = site / "brokenfed-1.2.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenfed\nVersion: 1.2\n")
    lines = [f"[{GROUP}]", *(f"{k} = {v}" for k, v in entry_points.items())]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(site))
    for mod in [m for m in sys.modules if m.split(".")[0] in {n.split(".")[0] for n in modules}]:
        monkeypatch.delitem(sys.modules, mod)


BROKEN = "raise ImportError(\"No module named 'torch_scatter'\")\n"
WORKING = (
    "from lightfed.strategy import FedAvg\n\n"
    "class Fine(FedAvg):\n    '''A plugin that imports.'''\n"
)


@pytest.fixture
def registry() -> Registry:
    return Registry("strategy", GROUP)


def test_a_plugin_named_like_its_entry_point_reports_the_import_error(registry, tmp_path, monkeypatch) -> None:
    # Prepare: entry point "FedScatter" whose module raises ImportError, next to one that works
    install(tmp_path, monkeypatch, {"FedScatter": "brokenfed_scatter:FedScatter", "Fine": "brokenfed_fine:Fine"},
            {"brokenfed_scatter": BROKEN, "brokenfed_fine": WORKING})

    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(KeyError) as info:
            registry.get("fedscatter")

    # Assert: the name, the entry point, the distribution and the real error, chained
    message = info.value.args[0]
    assert "'fedscatter' is installed (entry point FedScatter = brokenfed_scatter:FedScatter of brokenfed 1.2)" in message
    assert "but failed to import: ImportError: No module named 'torch_scatter'" in message
    assert "unknown" not in message
    assert isinstance(info.value.__cause__, ImportError)
    assert registry.get("Fine").__name__ == "Fine"


def test_a_class_of_a_broken_module_is_matched_by_the_entry_point_value(registry, tmp_path, monkeypatch) -> None:
    # the entry point names a module ("zoo"); the requested class is its attribute or the module's last name
    install(tmp_path, monkeypatch, {"zoo": "brokenfed.fedgraph"}, {"brokenfed.__init__": "", "brokenfed.fedgraph": BROKEN})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(KeyError, match=r"'FedGraph' is installed \(entry point zoo = brokenfed\.fedgraph of brokenfed 1\.2\) but failed to import: ImportError"):
            registry.get("FedGraph")


def test_an_unknown_name_lists_the_plugins_that_failed(registry, tmp_path, monkeypatch) -> None:
    install(tmp_path, monkeypatch, {"FedScatter": "brokenfed_scatter:FedScatter"}, {"brokenfed_scatter": BROKEN})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(KeyError) as info:
            registry.get("FedSomethingElse")

    message = info.value.args[0]
    assert message.startswith("unknown strategy 'FedSomethingElse'")
    assert ("Installed but failed to import: FedScatter (entry point FedScatter = brokenfed_scatter:FedScatter of "
            "brokenfed 1.2): ImportError: No module named 'torch_scatter'") in message


def test_the_warning_at_load_names_the_distribution(registry, tmp_path, monkeypatch) -> None:
    install(tmp_path, monkeypatch, {"FedScatter": "brokenfed_scatter:FedScatter"}, {"brokenfed_scatter": BROKEN})

    with pytest.warns(RuntimeWarning, match=r"FedScatter.*brokenfed 1\.2.*ImportError: No module named 'torch_scatter'"):
        registry.load_entry_points()


def test_a_plugin_fixed_and_rescanned_is_no_longer_reported(registry, tmp_path, monkeypatch) -> None:
    install(tmp_path, monkeypatch, {"Fine": "brokenfed_fine:Fine"}, {"brokenfed_fine": BROKEN})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert "Fine" not in registry

    (tmp_path / "brokenfed_fine.py").write_text(WORKING)
    monkeypatch.delitem(sys.modules, "brokenfed_fine", raising=False)
    registry.load_entry_points(force=True)

    assert registry.get("Fine").__name__ == "Fine"
    with pytest.raises(KeyError) as info:
        registry.get("Other")
    assert "failed to import" not in info.value.args[0]
