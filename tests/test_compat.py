"""Every internal of diffusers, PEFT, accelerate, torch and insightface that `diffusers_hyperlora.utils.compat` relies
on still exists and behaves as that module assumes. A failure names the library and its installed version: after an
upgrade, fix `utils/compat.py` (and only it)."""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import inspect
import pickle
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import peft
import pytest
import torch
from conftest import enable_group_offload
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from torch import nn

from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_config
from diffusers_hyperlora.utils import compat


@contextmanager
def internal(library: str, what: str) -> Iterator[None]:
    """Turn any failure inside the block into one that names the library, its version and the internal."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - an internal that changed may fail in any way
        version = importlib.metadata.version(library)
        pytest.fail(
            f"{library} {version}: the internal `{what}` that diffusers_hyperlora/utils/compat.py relies on changed "
            f"({type(error).__name__}: {error}). Update utils/compat.py for {library} {version}.",
            pytrace=True,
        )


def _target(unet: nn.Module) -> str:
    return tiny_hyperlora_config(unet).linears[0].module_path


def _with_adapter(pipe, name: str = "x", rank: int = 2, alpha: int = 4) -> tuple[nn.Module, BaseTunerLayer, str]:
    unet = pipe.unet
    path = _target(unet)
    with compat.quiet_peft_adapter_warnings():
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=[path]), adapter_name=name)
    layer = unet.get_submodule(path)
    torch.nn.init.normal_(layer.lora_B[name].weight)  # PEFT initializes B to zero: make the LoRA visible
    return unet, layer, path


def test_peft_state_dict_layout(pipe):
    unet, layer, path = _with_adapter(pipe)
    with internal("peft", "`<path>.base_layer.` / `<path>.lora_A.<adapter>.weight` state-dict keys"):
        keys = set(unet.state_dict())
        assert f"{path}{compat.BASE_LAYER_KEY}weight" in keys
        assert compat.lora_parameter_name(path, "A", "x") in keys
        assert compat.lora_parameter_name(path, "B", "x") in keys
        containers = {name for name, _ in layer.named_children()}
        assert {"lora_A", "lora_B"} <= containers <= set(compat.ADAPTER_CONTAINERS) | {"base_layer", "lora_dropout"}
    with internal("peft", "LoraLayer.lora_A / lora_B ModuleDicts"):
        assert compat.layer_adapter_names(layer) == {"x"}
        down, up = compat.lora_factors(layer, "x")
        base = layer.get_base_layer()
        assert down.shape == (2, base.in_features) and up.shape == (base.out_features, 2)
        assert down is unet.get_parameter(compat.lora_parameter_name(path, "A", "x"))
        assert compat.lora_factors(layer, "missing") is None


def test_peft_forward_flags_and_scaling(pipe):
    unet, layer, _ = _with_adapter(pipe, rank=2, alpha=4)
    x = torch.randn(3, layer.get_base_layer().in_features)
    down, up = compat.lora_factors(layer, "x")
    with internal("peft", "LoraLayer.scaling / disable_adapters / merged / active_adapters"):
        assert compat.adapter_scale(layer, "x") == 2.0  # lora_alpha / r
        layer.set_scale("x", 0.5)
        assert compat.adapter_scale(layer, "x") == 2.0 * 0.5
        compat.set_adapter_scale(layer, "x", 0.3)  # put back exactly, and the forward pass uses it
        assert compat.adapter_scale(layer, "x") == 0.3
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x) + 0.3 * (x @ down.T @ up.T))
        compat.set_adapter_scale(layer, "x", 2.0 * 0.5)
        assert compat.adapter_runs_in_forward(layer, "x")
        # What the per-sample hooks add is exactly what PEFT's forward adds: base + scale * B A x.
        expected = layer.get_base_layer()(x) + compat.adapter_scale(layer, "x") * (x @ down.T @ up.T)
        torch.testing.assert_close(layer(x), expected)
        layer.enable_adapters(False)
        assert not compat.adapter_runs_in_forward(layer, "x")
        torch.testing.assert_close(layer(x), layer.get_base_layer()(x))
        layer.enable_adapters(True)
        layer.set_adapter([])
        assert not compat.adapter_runs_in_forward(layer, "x")
        layer.set_adapter(["x"])
        layer.merge(adapter_names=["x"])
        assert not compat.adapter_runs_in_forward(layer, "x")


def test_peft_merge_bookkeeping_and_overrides(pipe):
    _, layer, _ = _with_adapter(pipe)
    base = layer.get_base_layer()
    original = base.weight.detach().clone()
    calls = []

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        calls.append(("merge", adapter_names))

    def unmerge(self) -> None:
        calls.append("unmerge")

    # diffusers reads the signature of `merge` (it must take `adapter_names`), so the override keeps PEFT's.
    compat.override_merge(layer, merge, unmerge)
    with internal("peft", "per-instance merge/unmerge overrides called by diffusers' fuse_lora/unfuse_lora"):
        pipe.fuse_lora(adapter_names=["x"])
        pipe.unfuse_lora()
        assert calls == [("merge", ["x"]), "unmerge"], calls
    with internal("peft", "LoraLayer.merge / unmerge / merged_adapters"):
        compat.peft_merge(layer, ["x"])  # the class's merge, not the override
        assert len(calls) == 2 and compat.merged_adapter_names(layer) == ["x"] and layer.merged
        assert not torch.equal(base.weight, original)
        compat.peft_unmerge(layer)
        assert compat.merged_adapter_names(layer) == [] and not layer.merged
        torch.testing.assert_close(base.weight, original)
        compat.peft_merge(layer, ["x"])
        compat.mark_unmerged(layer)
        assert not layer.merged and compat.merged_adapter_names(layer) == []


def test_peft_warning_texts(pipe):
    unet, path = pipe.unet, _target(pipe.unet)

    def add(name: str) -> None:
        unet.add_adapter(LoraConfig(r=2, target_modules=[path]), adapter_name=name)

    with internal("peft", "the warning texts filtered by quiet_peft_adapter_warnings"):
        add("a")
        with pytest.warns(UserWarning, match="Already found a `peft_config` attribute"):
            add("b")
        unet.set_adapters(["a"])
        with pytest.warns(UserWarning, match="Adapter .* was active which is now deleted"):
            unet.delete_adapters(["a"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with compat.quiet_peft_adapter_warnings():
                add("c")
                unet.set_adapters(["c"])
                unet.delete_adapters(["c"])


def test_diffusers_peft_bookkeeping_and_wrapper_removal(pipe):
    unet, _, path = _with_adapter(pipe)
    with internal("diffusers", "ModelMixin.peft_config / _hf_peft_config_loaded / recurse_remove_peft_layers"):
        assert set(compat.adapter_configs(unet)) == {"x"}
        assert unet._hf_peft_config_loaded
        unet.delete_adapters(["x"])
        assert compat.adapter_configs(unet) == {}
        compat.remove_peft_wrappers(unet)
        assert type(unet.get_submodule(path)) is nn.Linear
        assert not any(isinstance(module, BaseTunerLayer) for module in unet.modules())
        assert not unet._hf_peft_config_loaded and not hasattr(unet, "peft_config")
        _with_adapter(pipe, "again")  # diffusers starts fresh
        assert set(compat.adapter_configs(unet)) == {"again"}


def test_unet_call_layout(pipe):
    with internal("diffusers", "UNet2DConditionModel.forward(sample, timestep, encoder_hidden_states, ...)"):
        names = list(inspect.signature(UNet2DConditionModel.forward).parameters)
        assert names[1:4] == ["sample", "timestep", "encoder_hidden_states"], names  # names[0] is self
    calls, guidance = [], []

    def hook(module, args, kwargs):
        calls.append(compat.denoiser_call_inputs(args, kwargs))
        guidance.append(compat.calling_pipeline_guidance())

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        options = dict(num_inference_steps=1, height=64, width=64, output_type="latent")
        pipe(["a", "b"], guidance_scale=5.0, generator=torch.Generator().manual_seed(0), **options)
        pipe(["a", "b"], guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **options)
    finally:
        handle.remove()
    with internal("diffusers", "the SDXL pipeline's batch layout (`torch.cat([latents] * 2)` under guidance)"):
        (guided, guided_prompts), (plain, plain_prompts) = calls
        assert guided.shape[0] == 4 and guided_prompts is not None and guided_prompts.shape[0] == 4
        assert torch.equal(guided[:2], guided[2:]) and not torch.equal(guided_prompts[:2], guided_prompts[2:])
        assert plain.shape[0] == 2 and plain_prompts.shape[0] == 2 and not torch.equal(plain[0], plain[1])
    with internal("diffusers", "DiffusionPipeline.__call__(self, ...) and its do_classifier_free_guidance"):
        assert guidance == [True, False], guidance
        assert compat.calling_pipeline_guidance() is None  # no pipeline is calling
    direct = compat.denoiser_call_inputs((guided, 1, guided_prompts), {})
    assert direct[0] is guided and direct[1] is guided_prompts


def test_pipeline_devices_and_accelerate_hooks(pipe):
    with internal("diffusers", "DiffusionPipeline._execution_device"):
        assert compat.execution_device(pipe).type == "cpu"
    with internal("accelerate", "`_hf_hook` set by enable_model_cpu_offload"):
        assert not compat.has_accelerate_hook(pipe.unet)
        pipe.enable_model_cpu_offload(device="cpu")
        assert compat.has_accelerate_hook(pipe.unet)
        assert compat.execution_device(pipe).type == "cpu"
    with internal("accelerate", "remove_hook_from_module and `_hf_hook`"):
        pipe.remove_all_hooks()
        compat.remove_accelerate_hooks(pipe)
        assert not compat.has_accelerate_hook(pipe.unet)


def test_sequential_offload_device(pipe):
    with internal("diffusers", "DiffusionPipeline._offload_device set by enable_sequential_cpu_offload"):
        pipe.enable_sequential_cpu_offload(device="cpu")
        assert torch.device(compat.sequential_offload_device(pipe)).type == "cpu"
        assert compat.has_accelerate_hook(pipe.unet)
        compat.remove_accelerate_hooks(pipe)
        assert not compat.has_accelerate_hook(pipe.unet)
        assert all(p.device.type != "meta" for p in pipe.unet.parameters())


def test_group_offload_detection(pipe):
    with internal("diffusers", "hooks.group_offloading._is_group_offload_enabled"):
        assert not compat.group_offload_enabled(pipe.unet)
        # False only where this diffusers cannot enable group offloading (conftest.GROUP_OFFLOAD_NEEDS_ACCELERATOR):
        # then the failed attempt must not read as enabled.
        enabled = enable_group_offload(pipe.unet)
        assert compat.group_offload_enabled(pipe.unet) is enabled


class _Code:
    """A pickled instance of this class needs the full unpickler (it names a class): weights-only refuses it."""


def test_accelerate_load_state_is_weights_only_and_restores_every_state(tmp_path):
    import random

    import numpy as np
    from accelerate import Accelerator

    with internal("accelerate", "Accelerator.load_state (load_kwargs / torch.load of its random-state file)"):
        accelerator = Accelerator(cpu=True)
        model = accelerator.prepare(nn.Linear(3, 2))
        accelerator.step = 6  # the accumulation counter lives in the random-state file
        accelerator.save_state(str(tmp_path / "state"))
        weight = model.weight.detach().clone()
        draws = torch.rand(4), np.random.rand(4), random.random()
        with torch.no_grad():
            model.weight.zero_()
        accelerator.step = 0
        torch.manual_seed(1), np.random.seed(1), random.seed(1)
        compat.load_accelerate_state(accelerator, str(tmp_path / "state"))
        assert torch.equal(model.weight, weight) and accelerator.step == 6
        assert torch.equal(torch.rand(4), draws[0]) and np.array_equal(np.random.rand(4), draws[1])
        assert random.random() == draws[2]
        torch.save({"state": _Code()}, tmp_path / "state" / "optimizer.bin")
        optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    # torch's own refusal, by design: compat.load_accelerate_state only asks torch.load for weights-only unpickling
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights.only"):
        compat.load_accelerate_state(accelerator, str(tmp_path / "state"))
    assert optimizer.state_dict()["state"] == {}


def test_accelerate_save_state_file_names(tmp_path):
    from accelerate import Accelerator

    with internal("accelerate", "the files Accelerator.save_state writes (model.safetensors, optimizer.bin, ...)"):
        accelerator = Accelerator(cpu=True)
        model = nn.Linear(3, 2)
        optimizer = torch.optim.AdamW(model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        accelerator.save_state(str(tmp_path))
        names = {compat.ACCELERATE_MODEL_FILE, compat.ACCELERATE_OPTIMIZER_FILE, compat.ACCELERATE_SCHEDULER_FILE}
        assert names <= {path.name for path in tmp_path.iterdir()}
        with safe_open(tmp_path / compat.ACCELERATE_MODEL_FILE, "pt") as weights:
            assert set(weights.keys()) == {"weight", "bias"}
        assert "param_groups" in torch.load(tmp_path / compat.ACCELERATE_OPTIMIZER_FILE, weights_only=True)
        assert "last_epoch" in torch.load(tmp_path / compat.ACCELERATE_SCHEDULER_FILE, weights_only=True)


def test_torch_foreach_and_parameter_registry():
    with internal("torch", "torch._foreach_copy_ / torch._foreach_zero_"):
        destinations = [torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(4)]
        sources = [torch.randn(2, 3), torch.randn(4)]
        compat.foreach_copy_(destinations, sources)  # casts like Tensor.copy_
        assert torch.equal(destinations[0], sources[0].to(torch.bfloat16)) and torch.equal(destinations[1], sources[1])
        compat.foreach_zero_(destinations)
        assert not any(t.any() for t in destinations)
    with internal("torch", "nn.Module._parameters"):
        linear = nn.Linear(3, 2)
        weight = linear.weight
        assert compat.take_parameter(linear, "weight") is weight
        assert "weight" not in dict(linear.named_parameters())
        linear.weight = torch.ones(2, 3)  # a plain tensor stands in
        del linear.weight
        compat.put_parameter(linear, "weight", weight)
        assert linear.weight is weight and dict(linear.named_parameters())["weight"] is weight


def test_internal_reports_the_library_version():
    """The helper above really fails, and names the version (so a changed internal cannot pass silently)."""
    with pytest.raises(pytest.fail.Exception, match=f"peft {peft.__version__}: the internal `thing`"):
        with internal("peft", "thing"):
            raise AttributeError("gone")


def test_save_pretrained_instance_override_and_state_dict_hooks(pipe, tmp_path):
    """`hide_adapters_when_saving` relies on both: `pipe.save_pretrained` calls the instance's `save_pretrained`,
    and `ModelMixin.save_pretrained` writes `state_dict()` (post-hooks applied)."""
    unet = pipe.unet
    dropped = next(iter(unet.state_dict()))
    calls = []

    def save(self, *args, **kwargs):
        calls.append(self)

        def hook(module, state_dict, prefix, local_metadata):
            del state_dict[prefix + dropped]

        handle = self.register_state_dict_post_hook(hook)
        try:
            return type(self).save_pretrained(self, *args, **kwargs)
        finally:
            handle.remove()

    compat.override_save_pretrained(unet, save)
    with internal("diffusers", "DiffusionPipeline.save_pretrained -> component.save_pretrained -> state_dict()"):
        pipe.save_pretrained(tmp_path / "pipe")
        assert calls == [unet]
        with safe_open(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors", "pt") as weights:
            keys = set(weights.keys())
        assert dropped not in keys and keys == set(unet.state_dict()) - {dropped}
        twin = copy.deepcopy(unet)
        twin.save_pretrained(tmp_path / "twin")
        assert calls == [unet, twin]
    compat.restore_save_pretrained(unet)
    compat.restore_save_pretrained(unet)  # nothing to undo: no error
    unet.save_pretrained(tmp_path / "plain")
    assert calls == [unet, twin]


def test_vae_latent_distribution_sampling(pipe):
    with internal("diffusers", "models.autoencoders.vae.DiagonalGaussianDistribution"):
        vae = pipe.vae
        pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        distribution = vae.encode(pixels).latent_dist
        parameters = distribution.parameters
        mean, logvar = parameters.chunk(2, dim=1)
        sample = compat.sample_latent_distribution(parameters, torch.Generator().manual_seed(3))
        assert torch.equal(sample, distribution.sample(torch.Generator().manual_seed(3)))
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(sample, mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise)
        rows = compat.sample_latent_distribution(parameters, [torch.Generator().manual_seed(s) for s in (5, 6)])
        for row, seed in enumerate((5, 6)):  # one generator per row, as the training loop passes them
            noise = torch.randn((1, *mean.shape[1:]), generator=torch.Generator().manual_seed(seed))
            expected = mean[row : row + 1] + distribution.std[row : row + 1] * noise
            torch.testing.assert_close(rows[row : row + 1], expected)


def test_insightface_loads_a_folder_without_downloading(tmp_path):
    pytest.importorskip("insightface")
    from diffusers_hyperlora.face.analyzer import FACE_TASKS
    from diffusers_hyperlora.testing.tiny_face import export_tiny_antelopev2

    pack = export_tiny_antelopev2(tmp_path / "home" / "pack")
    cpu = ["CPUExecutionProvider"]
    with internal("insightface", "FaceAnalysis(name=<absolute folder>, root=...) and its `models` dict"):
        app = compat.insightface_app_from_folder(pack, cpu, FACE_TASKS)
        assert compat.insightface_tasks(app) == set(FACE_TASKS)
        assert sorted(path.name for path in (tmp_path / "home").iterdir()) == ["pack"]  # no `models/` download
        only = compat.insightface_app_from_folder(pack, cpu, ["detection"])
        assert compat.insightface_tasks(only) == {"detection"}
    with internal("insightface", "FaceAnalysis's failure on a folder without a face detector"):
        faceless = tmp_path / "home" / "no-detector"
        faceless.mkdir()
        for name in ("2d106det.onnx", "glintr100.onnx"):
            shutil.copy(pack / name, faceless / name)
        assert compat.insightface_app_from_folder(faceless, cpu, FACE_TASKS) is None
    assert compat.insightface_tasks(object()) == set()


def test_the_lora_loaders_module_defines_the_mixins_the_pipelines_use():
    """`pipeline/install.py` installs the pipeline methods when this module loads: it must define the loader mixins
    (not re-export them), and the pipelines must derive from them."""
    import diffusers.loaders
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    names = ("StableDiffusionXLLoraLoaderMixin", "StableDiffusionLoraLoaderMixin", "SD3LoraLoaderMixin")
    pipelines = (StableDiffusionXLPipeline, StableDiffusionPipeline, StableDiffusion3Pipeline, FluxPipeline)
    with internal("diffusers", f"the module {compat.LORA_LOADERS_MODULE} that defines the LoRA loader mixins"):
        module = importlib.import_module(compat.LORA_LOADERS_MODULE)
        for name in (*names, "FluxLoraLoaderMixin"):
            mixin = getattr(diffusers.loaders, name)
            assert getattr(module, name) is mixin and mixin.__module__ == compat.LORA_LOADERS_MODULE, name
        for pipeline in pipelines:
            assert any(base.__module__ == compat.LORA_LOADERS_MODULE for base in pipeline.__mro__), pipeline


def test_importing_compat_loads_only_the_standard_library():
    """`import diffusers_hyperlora` reads `LORA_LOADERS_MODULE` from here and must stay light."""
    code = (
        "import sys\n"
        "import diffusers_hyperlora.utils.compat\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'peft', 'accelerate', 'insightface') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------- the one place
PACKAGE = Path(__file__).resolve().parents[1] / "src" / "diffusers_hyperlora"
COMPAT = PACKAGE / "utils" / "compat.py"
# Public-looking names of other libraries' internals that utils/compat.py wraps (attributes, functions, classes).
INTERNAL_NAMES = {
    "merged_adapters",  # PEFT LoraLayer bookkeeping
    "disable_adapters",
    "scaling",
    "recurse_remove_peft_layers",  # diffusers.utils.peft_utils
    "peft_config",  # set by diffusers' add_adapter
    "DiagonalGaussianDistribution",  # diffusers.models.autoencoders.vae
    "FaceAnalysis",  # insightface: loaded from a folder by compat
    "filterwarnings",  # PEFT warnings filtered by their text
    "f_locals",  # the calling pipeline's frame
}


def _private_reaches(path: Path) -> list[str]:
    """`file:line: what` for each internal of another library that `path` reaches itself."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    stdlib_modules = {
        alias.asname or alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name.split(".")[0] in sys.stdlib_module_names
    }
    found = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{path.name}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            base = ast.unparse(node.value)
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            ours = base in {"self", "cls", "super()"} or base in stdlib_modules
            if private and not ours:
                flag(node, ast.unparse(node))
            elif node.attr in INTERNAL_NAMES:
                flag(node, ast.unparse(node))
        elif isinstance(node, ast.Name) and node.id in INTERNAL_NAMES:
            flag(node, node.id)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            parts = (node.module or "").split(".") + [alias.name for alias in node.names]
            if any(part.startswith("_") for part in parts) or set(parts) & INTERNAL_NAMES:
                flag(node, f"from {node.module} import {', '.join(alias.name for alias in node.names)}")
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in {"getattr", "hasattr", "setattr"}:
            name = node.args[1] if len(node.args) > 1 else None
            text = str(name.value) if isinstance(name, ast.Constant) else ""
            if (text.startswith("_") and not text.startswith("__")) or text in INTERNAL_NAMES:
                flag(node, ast.unparse(node))
        elif isinstance(node, ast.Constant) and node.value == compat.LORA_LOADERS_MODULE:
            flag(node, repr(node.value))
    return sorted(found, key=lambda line: int(line.split(":")[1]))


@pytest.mark.parametrize(
    "relative", [p.relative_to(PACKAGE).as_posix() for p in sorted(PACKAGE.rglob("*.py")) if p != COMPAT]
)
def test_only_compat_reaches_other_libraries_internals(relative):
    found = _private_reaches(PACKAGE / relative)
    assert not found, "move these into diffusers_hyperlora/utils/compat.py (with a test here):\n" + "\n".join(found)


def test_the_internals_scan_finds_what_it_should(tmp_path):
    source = tmp_path / "sample.py"
    source.write_text(
        "import argparse\n"
        "from diffusers.hooks.group_offloading import _is_group_offload_enabled\n"  # 2
        "from diffusers.utils.peft_utils import recurse_remove_peft_layers\n"  # 3
        "def f(self, pipe, layer):\n"
        "    pipe._execution_device\n"  # 5
        "    getattr(pipe.unet, '_hf_hook', None)\n"  # 6
        "    layer.merged_adapters.clear()\n"  # 7
        "    layer.scaling['id']\n"  # 8
        "    self._ours, super()._hook(), argparse._ActionsContainer, pipe.__class__\n"
        "    return 'diffusers.loaders.lora_pipeline'\n"  # 10
        "def g(unet):\n"
        "    return getattr(unet, 'peft_config', None), getattr(unet, 'config', None)\n"  # 12
    )
    assert _private_reaches(source) == [
        "sample.py:2: from diffusers.hooks.group_offloading import _is_group_offload_enabled",
        "sample.py:3: from diffusers.utils.peft_utils import recurse_remove_peft_layers",
        "sample.py:5: pipe._execution_device",
        "sample.py:6: getattr(pipe.unet, '_hf_hook', None)",
        "sample.py:7: layer.merged_adapters",
        "sample.py:8: layer.scaling",
        "sample.py:10: 'diffusers.loaders.lora_pipeline'",
        "sample.py:12: getattr(unet, 'peft_config', None)",
    ]


def test_flux_latent_packing():
    with internal("diffusers", "FluxPipeline._pack_latents / _unpack_latents / _prepare_latent_image_ids"):
        latents = torch.randn(2, 4, 6, 8)
        packed = compat.flux_pack_latents(latents)
        assert packed.shape == (2, 3 * 4, 4 * 4)
        for row, column, i, j in ((0, 0, 0, 0), (2, 3, 1, 1), (1, 2, 0, 1)):
            patch = packed[:, row * 4 + column].view(2, 4, 2, 2)  # [B, C, 2, 2]: channel-major 2x2 patches
            assert torch.equal(patch[:, :, i, j], latents[:, :, 2 * row + i, 2 * column + j])
        assert torch.equal(compat.flux_unpack_latents(packed, 6, 8), latents)
        ids = compat.flux_latent_image_ids(3, 4, torch.device("cpu"), torch.float32)
        rows, columns = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
        assert torch.equal(ids, torch.stack([torch.zeros(3, 4), rows, columns], dim=-1).reshape(12, 3))


def test_every_compat_name_is_checked_here():
    """Each function and constant of utils/compat.py is exercised by a test of this file."""
    source = Path(__file__).read_text(encoding="utf-8")
    functions = [n for n, v in vars(compat).items() if callable(v) and getattr(v, "__module__", "") == compat.__name__]
    constants = [n for n, v in vars(compat).items() if n.isupper() and isinstance(v, str | tuple)]
    names = [name for name in functions + constants if not name.startswith("_")]
    assert len(names) > 30
    unchecked = [name for name in names if f"compat.{name}" not in source]
    assert not unchecked, f"add a test of {unchecked} to tests/test_compat.py"


def test_pipeline_repeats_each_prompt_for_its_images(pipe):
    """Per-sample identities give the rows `prompts x num_images_per_prompt` in order (`batch_rows`): diffusers
    repeats each prompt's embeddings for its images next to each other, in each guidance half."""
    calls = []

    def hook(module, args, kwargs):
        calls.append(compat.denoiser_call_inputs(args, kwargs)[1])

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        options = dict(num_inference_steps=1, height=64, width=64, output_type="latent", num_images_per_prompt=2)
        pipe(["a", "b"], guidance_scale=5.0, generator=torch.Generator().manual_seed(0), **options)
    finally:
        handle.remove()
    with internal("diffusers", "encode_prompt's repeat of each prompt for num_images_per_prompt"):
        (prompts,) = calls
        assert prompts.shape[0] == 8  # [uncond a, uncond a, uncond b, uncond b, a, a, b, b]
        conditional = prompts[4:]
        assert torch.equal(conditional[0], conditional[1]) and torch.equal(conditional[2], conditional[3])
        assert not torch.equal(conditional[1], conditional[2])
