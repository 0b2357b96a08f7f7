"""The one device and dtype policy of the command line and the demo (`utils/devices.py`): which device names are
taken, which are refused (unknown, or not on this machine), and the dtype each device runs in."""

from __future__ import annotations

import sys

import pytest
import torch

from diffusers_hyperlora.cli import main
from diffusers_hyperlora.errors import InvalidArgumentError
from diffusers_hyperlora.utils.devices import check_device_name, device_and_dtype


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:0", "cuda:12", "mps", None])
def test_known_device_names_pass_the_name_check(name):
    check_device_name(name)


@pytest.mark.parametrize("name", ["tpu", "meta", "xpu", "gpu", "cuda:", "cuda:x", "CPU", " cpu", "mps:0", ""])
def test_unknown_device_names_are_refused(name):
    with pytest.raises(InvalidArgumentError, match="is not a device HyperLoRA runs on") as caught:
        device_and_dtype(name)
    assert caught.value.argument == "device" and repr(name) in str(caught.value)


def test_the_dtype_is_float32_off_cuda_unless_given():
    assert device_and_dtype("cpu") == (torch.device("cpu"), torch.float32)
    assert device_and_dtype(torch.device("cpu"), "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert device_and_dtype("cpu", torch.float16) == (torch.device("cpu"), torch.float16)
    with pytest.raises(InvalidArgumentError) as caught:
        device_and_dtype("cpu", "int8")
    assert caught.value.argument == "dtype"


def test_cuda_runs_in_float16_and_its_index_is_checked(monkeypatch):
    """On a machine with one CUDA GPU (its count stood in for here, nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_and_dtype("cuda") == (torch.device("cuda"), torch.float16)
    assert device_and_dtype(None) == (torch.device("cuda"), torch.float16)
    assert device_and_dtype("cuda:0", torch.float32) == (torch.device("cuda:0"), torch.float32)
    with pytest.raises(InvalidArgumentError, match="has 1 CUDA GPU") as caught:
        device_and_dtype("cuda:1")
    assert caught.value.argument == "device"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_refused(name):
    assert device_and_dtype(None) == (torch.device("cpu"), torch.float32)
    with pytest.raises(InvalidArgumentError, match="sees no CUDA GPU") as caught:
        device_and_dtype(name)
    assert caught.value.argument == "device" and "device='cpu'" in str(caught.value)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the refusal on machines without MPS")
def test_mps_without_an_apple_gpu_is_refused():
    with pytest.raises(InvalidArgumentError, match="no Apple GPU") as caught:
        device_and_dtype("mps")
    assert caught.value.argument == "device"


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the refusal on machines without MPS")
def test_command_refuses_a_device_this_machine_lacks(tmp_path, capsys):
    """`--device mps` passes the name check (no torch) and is refused by the shared policy, in the flag's words."""
    argv = ["export", str(tmp_path / "a.safetensors"), "-o", str(tmp_path / "x.safetensors"), "--model", "tiny"]
    (tmp_path / "a.safetensors").write_bytes(b"")
    assert main([*argv, "--device", "mps"]) == 1
    err = capsys.readouterr().err
    assert "--device 'mps': this torch installation sees no Apple GPU" in err and "--device cpu" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "argv, module, extra",
    [
        (["demo"], "gradio", "demo"),
        (["train", "--data", "{data}", "--base-model", "tiny", "--output-dir", "{out}"], "accelerate", "train"),
    ],
)
def test_a_missing_extra_is_named_with_how_to_install_it(argv, module, extra, tmp_path, monkeypatch, capsys):
    """The package is not on the package index yet: the hint also says how to install the extra from a clone."""
    (tmp_path / "data").mkdir()
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError, as when it is missing
    argv = [arg.format(data=tmp_path / "data", out=tmp_path / "run") for arg in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"needs {module}" in err and f"pip install 'diffusers-hyperlora[{extra}]'" in err, err
    assert f"from a clone: pip install -e '.[{extra}]'" in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("port", [0, -1, 65536, 99999, "7860", 7860.0, True, None])
def test_a_bad_port_is_refused_in_the_callers_words(port):
    """One port check for `launch_demo` (`Port ...`) and the command line (`--port ...`)."""
    from diffusers_hyperlora.utils.devices import check_port

    for label in ("Port", "--port"):
        with pytest.raises(InvalidArgumentError, match=f"^{label} must be a whole number from 1 to 65535") as caught:
            check_port(port, label)
        assert caught.value.argument == "port"
    assert check_port(1) == 1 and check_port(65535, "--port") == 65535


def test_the_cli_predictor_on_a_cpu_runs_its_small_networks_in_float32_and_keeps_its_banks(tmp_path):
    """`export`/`identity` load the predictor alone (`placement.place_alone`): on a CPU the projector and
    resamplers run in float32, the banks keep the checkpoint's 16-bit storage (they accumulate in float32)."""
    from diffusers_hyperlora.cli import build_parser, commands
    from diffusers_hyperlora.testing.tiny_models import tiny_hyperlora_predictor

    model = str(tmp_path / "model")
    tiny_hyperlora_predictor(base_rank=4).to(torch.float16).save_pretrained(model)
    args = build_parser().parse_args(["export", "me.safetensors", "-o", "lora.safetensors", "--model", model])
    args.device = "cpu"  # whatever this machine has
    predictor = commands.load_predictor(model, args)
    small = [predictor.id_projector, predictor.resampler, predictor.base_resampler]
    assert {p.dtype for module in small for p in module.parameters()} == {torch.float32}
    banks = [predictor.id_bank, predictor.base_bank]
    assert {p.dtype for bank in banks for p in bank.parameters()} == {torch.float16}
    assert {p.device.type for p in predictor.parameters()} == {"cpu"} and not predictor.training
