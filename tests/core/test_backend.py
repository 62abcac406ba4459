"""``Backend`` objects: detection by module name, and plugins that import no backend library."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tqai.backend import Backend, module_detector


def _class_from(module: str, name: str = "Model", bases: tuple[type, ...] = ()) -> type:
    return type(name, bases, {"__module__": module})


def test_module_detector_matches_any_class_in_the_mro():
    detects = module_detector("torch", "transformers")
    torch_base = _class_from("torch.nn.modules.module", "Module")
    user_model = _class_from("my_project.models", "MyModel", (torch_base,))
    hf_model = _class_from("transformers.models.llama.modeling_llama", "LlamaModel")

    assert detects(user_model())
    assert detects(hf_model())
    assert detects(_class_from("torch")())


@pytest.mark.parametrize("module", ["torchvision.models", "numpy", "mlx.nn", "builtins"])
def test_module_detector_rejects_other_packages(module):
    assert not module_detector("torch", "transformers")(_class_from(module)())


def test_backend_is_frozen_and_keyword_only():
    backend = Backend(
        name="fake",
        package="tqai-fake",
        array_namespace="numpy",
        info=dict,
        detects=module_detector("numpy"),
    )

    with pytest.raises(AttributeError):
        backend.name = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Backend("fake", "tqai-fake", "numpy", dict, bool)  # type: ignore[misc]


def test_backend_plugins_import_no_backend_library():
    code = (
        "import sys\n"
        "import tqai_torch._plugin as t, tqai_mlx._plugin as m, tqai_diffusers._plugin as d\n"
        "assert t.BACKEND.detects(object()) is False\n"
        "assert (t.BACKEND.name, m.BACKEND.name, d.BACKEND.name) == ('torch', 'mlx', 'diffusers')\n"
        "heavy = ('torch', 'mlx', 'mlx.core', 'transformers', 'diffusers', 'triton')\n"
        "print([name for name in heavy if name in sys.modules])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert result.stdout.strip() == "[]"
