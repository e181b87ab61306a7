"""Integrity of adapters and checkpoints: manifests written last and verified first, damaged files as one
line (exit 2, nothing written) or a ``ValueError`` naming the file, the automatic resume past a damaged
newest checkpoint, and a save into a full disk that leaves the earlier checkpoints as they were.

The launcher tests share one real 2-rank ZeRO-2 run (``reference``) with a checkpoint at every step.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adamix_ds import AdaMixConfig, add_adamix, load_adapter, save_adapter
from adamix_ds.io import adapter_state_dict
from adamix_ds.manifest import MANIFEST_NAME, verify_manifest, write_manifest
from adamix_ds.training import build_ds_config, parse_args
from adamix_ds.training.checkpoint import SCRATCH_GLOB

from conftest import REPO_ROOT, release_stale_shared_memory, subprocess_env
from test_ds_launcher import _command, _run
from test_launcher_args import _launcher, _run_bad
from tiny_models import tiny_classifier

WEIGHTS, CONFIG = "adapter_model.safetensors", "adamix_config.json"
MODEL_STATES, OPTIM_STATES_RANK1 = "mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"
STEPS = 4
# 64 examples on 2 ranks, micro-batch 4, accumulation 2: 4 steps per epoch; a checkpoint at every step.
ARGS = [
    "--task_name", "sst2", "--max_train_samples", "64", "--max_eval_samples", "16", "--max_seq_length", "32",
    "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--max_steps", str(STEPS),
    "--eval_steps", "4", "--save_steps", "1", "--save_total_limit", str(STEPS), "--logging_steps", "2",
    "--learning_rate", "2e-3", "--num_experts", "4", "--bottleneck_dim", "8", "--seed", "7",
]  # fmt: skip


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size: only the checksum can tell
    path.write_bytes(bytes(data))


# What is done to a file, and what the one line then says about it.
DAMAGES = {
    "truncated": (_truncate, "is truncated"),
    "zero-byte": (_empty, "is truncated: 0 of"),
    "bit-flipped": (_flip_bit, "fails its checksum"),
    "missing": (Path.unlink, "is missing"),
}


# -- manifests and adapter folders, in one process ------------------------------------------------------


def test_manifest_names_each_damaged_file_and_what_is_wrong(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(os.urandom(1000))
    (tmp_path / "sub" / "b.bin").write_bytes(os.urandom(10))
    write_manifest(tmp_path)
    assert set(json.loads((tmp_path / MANIFEST_NAME).read_text())["files"]) == {"a.bin", "sub/b.bin"}
    verify_manifest(tmp_path)
    original = (tmp_path / "a.bin").read_bytes()
    for damage, message in DAMAGES.values():
        damage(tmp_path / "a.bin")
        with pytest.raises(ValueError, match=f"a.bin {message}"):
            verify_manifest(tmp_path)
        (tmp_path / "a.bin").write_bytes(original)
    (tmp_path / "a.bin").write_bytes(original + b"x")
    with pytest.raises(ValueError, match="a.bin has 1001 bytes, manifest.json says 1000"):
        verify_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text('{"files": ')
    with pytest.raises(ValueError, match="manifest.json is damaged"):
        verify_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.raises(ValueError, match="manifest.json is missing"):
        verify_manifest(tmp_path)


def _tiny_adapter(folder: Path) -> Path:
    save_adapter(add_adamix(tiny_classifier("bert"), AdaMixConfig(bottleneck_dim=4, num_experts=2)), folder)
    return folder


@pytest.mark.parametrize("file", [WEIGHTS, CONFIG])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_load_adapter_verifies_the_manifest_before_touching_the_model(tmp_path, file, damage):
    folder = _tiny_adapter(tmp_path / "adapter")
    assert (folder / MANIFEST_NAME).is_file()
    make_damage, message = DAMAGES[damage]
    make_damage(folder / file)
    model = tiny_classifier("bert", seed=1)
    with pytest.raises(ValueError, match=f"{file} {message}"):
        load_adapter(model, folder)
    assert getattr(model, "adamix_config", None) is None  # nothing injected, nothing loaded


def _payload(sentinel: Path) -> object:
    """An object whose unpickling creates ``sentinel``."""

    class Payload:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    return Payload()


def test_adapter_without_manifest_loads_and_damaged_files_are_a_value_error(tmp_path):
    folder = _tiny_adapter(tmp_path / "adapter")
    (folder / MANIFEST_NAME).unlink()  # as written by hand or by an older version
    loaded = adapter_state_dict(load_adapter(tiny_classifier("bert", seed=1), folder))
    saved = load_file(str(folder / WEIGHTS))
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[key], saved[key]) for key in saved)

    good_weights = (folder / WEIGHTS).read_bytes()
    live, planted = tmp_path / "unpickled_live", tmp_path / "unpickled_by_load_adapter"
    pickle.loads(pickle.dumps(_payload(live)))
    assert live.exists(), "the payload is live"
    torch.save({"weights": _payload(planted)}, folder / WEIGHTS)  # a pickle under the safetensors name
    for write in (_truncate, _empty, lambda path: path.write_bytes(os.urandom(4096)), None):
        if write is not None:
            (folder / WEIGHTS).write_bytes(good_weights)
            write(folder / WEIGHTS)
        with pytest.raises(ValueError, match=f"{WEIGHTS} is not a readable safetensors file"):
            load_adapter(tiny_classifier("bert", seed=1), folder)
    assert not planted.exists(), "load_adapter unpickled a file"

    (folder / WEIGHTS).write_bytes(good_weights)
    for text in (b"\xff\xfe garbage", b"[1, 2]", b"7"):
        (folder / CONFIG).write_bytes(text)
        with pytest.raises(ValueError, match=CONFIG):
            load_adapter(tiny_classifier("bert", seed=1), folder)


def test_an_output_dir_named_auto_is_a_value_not_a_placeholder(tmp_path):
    run = parse_args(["--task_name", "rte", "--output_dir", str(tmp_path / "auto")])
    tensorboard = build_ds_config(REPO_ROOT / "ds_configs" / "zero2.json", run.training, 2, job_name="auto")["tensorboard"]
    # Not the literal "auto" either, which DeepSpeed itself would drop: the same folder, runs/auto.
    assert os.path.join(tensorboard["output_path"], tensorboard["job_name"]) == str(tmp_path / "auto" / "runs" / "auto") + os.sep


# -- the launcher on real checkpoints ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ds_config(tmp_path_factory) -> Path:
    """ZeRO-2 with torch's AdamW: a resumed run is then bit-for-bit an uninterrupted one (see test_ds_launcher)."""
    config = json.loads((REPO_ROOT / "ds_configs" / "zero2.json").read_text())
    config["optimizer"]["params"]["torch_adam"] = True
    path = tmp_path_factory.mktemp("config") / "zero2_torch_adam.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ds_config) -> Path:
    """An uninterrupted 2-rank run; its output_dir is named ``auto`` (once mistaken for a placeholder)."""
    output_dir = tmp_path_factory.mktemp("reference") / "auto"
    completed = _run("deepspeed", [*ARGS, "--deepspeed", str(ds_config), "--output_dir", str(output_dir)])
    assert completed.returncode == 0, completed.stderr[-5000:]
    return output_dir


@pytest.fixture(scope="module")
def launcher():
    return _launcher()


def _same_adapters(output_dir: Path, reference: Path) -> None:
    for folder in ("experts", "adapter"):
        expected, actual = load_file(str(reference / folder / WEIGHTS)), load_file(str(output_dir / folder / WEIGHTS))
        assert actual.keys() == expected.keys()
        for key in expected:
            assert torch.equal(actual[key], expected[key]), f"{folder}: {key} differs from the uninterrupted run"


def _files(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.slow
def test_every_checkpoint_and_adapter_carries_a_verified_manifest(reference):
    for step in range(1, STEPS + 1):
        verify_manifest(reference / "checkpoints" / f"step-{step}")
    listed = json.loads((reference / "checkpoints" / f"step-{STEPS}" / MANIFEST_NAME).read_text())["files"]
    assert {MODEL_STATES, OPTIM_STATES_RANK1, "trainer_state.json"} <= set(listed)
    for folder in ("adapter", "experts", "best_adapter"):
        verify_manifest(reference / folder)
    assert (reference / "runs" / "auto").is_dir()  # the TensorBoard job is named after output_dir
    assert not list((reference / "checkpoints").glob(SCRATCH_GLOB))


@pytest.mark.slow
@pytest.mark.parametrize("file", [MODEL_STATES, OPTIM_STATES_RANK1, "trainer_state.json"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_from_a_damaged_checkpoint_exits_2_and_writes_nothing(launcher, reference, ds_config, tmp_path, capsys, file, damage):
    checkpoint = tmp_path / "copy" / f"step-{STEPS}"
    shutil.copytree(reference / "checkpoints" / f"step-{STEPS}", checkpoint)
    make_damage, message = DAMAGES[damage]
    make_damage(checkpoint / file)
    output_dir = tmp_path / "out"
    argv = [*ARGS, "--deepspeed", str(ds_config), "--output_dir", str(output_dir), "--resume_from_checkpoint", str(checkpoint)]
    line = _run_bad(launcher, argv, capsys)
    assert f"{checkpoint / file} {message}" in line, line
    assert not output_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_adapter_exits_2_and_writes_nothing(launcher, reference, ds_config, tmp_path, capsys, damage):
    adapter = tmp_path / "experts"
    shutil.copytree(reference / "experts", adapter)
    make_damage, message = DAMAGES[damage]
    make_damage(adapter / WEIGHTS)
    output_dir = tmp_path / "out"
    line = _run_bad(
        launcher, [*ARGS, "--deepspeed", str(ds_config), "--output_dir", str(output_dir), "--adapter_name_or_path", str(adapter)], capsys
    )
    assert f"{adapter / WEIGHTS} {message}" in line, line
    assert not output_dir.exists()


@pytest.mark.slow
def test_a_truncated_adapter_without_manifest_exits_2_and_writes_nothing(launcher, reference, ds_config, tmp_path, capsys):
    adapter = tmp_path / "experts"
    shutil.copytree(reference / "experts", adapter)
    (adapter / MANIFEST_NAME).unlink()
    _truncate(adapter / WEIGHTS)
    output_dir = tmp_path / "out"
    line = _run_bad(
        launcher, [*ARGS, "--deepspeed", str(ds_config), "--output_dir", str(output_dir), "--adapter_name_or_path", str(adapter)], capsys
    )
    assert f"{adapter / WEIGHTS} is not a readable safetensors file" in line
    assert not output_dir.exists()


@pytest.mark.slow
def test_automatic_resume_with_no_checkpoint_that_verifies_exits_2_and_changes_nothing(launcher, reference, ds_config, tmp_path, capsys):
    output_dir = tmp_path / "auto"
    shutil.copytree(reference, output_dir)
    checkpoints = output_dir / "checkpoints"
    _truncate(checkpoints / f"step-{STEPS}" / OPTIM_STATES_RANK1)
    for step in range(1, STEPS):
        (checkpoints / f"step-{step}" / MANIFEST_NAME).unlink()
    before = _files(output_dir)
    line = _run_bad(launcher, [*ARGS, "--deepspeed", str(ds_config), "--output_dir", str(output_dir)], capsys)
    assert f"no checkpoint in {checkpoints} verifies" in line and f"{OPTIM_STATES_RANK1} is truncated" in line
    assert _files(output_dir) == before


@pytest.mark.slow
def test_automatic_resume_skips_a_damaged_newest_checkpoint_on_two_ranks(reference, ds_config, tmp_path):
    """A run that stopped after saving step 3, whose step 3 is damaged, resumes from step 2 by itself and
    ends bit-for-bit where the uninterrupted run ends."""
    output_dir = tmp_path / "auto"
    shutil.copytree(reference, output_dir)
    (output_dir / "metrics.json").unlink()
    for finished in ("adapter", "experts", "best_adapter", f"checkpoints/step-{STEPS}"):
        shutil.rmtree(output_dir / finished)
    (output_dir / "checkpoints" / "latest").write_text(f"step-{STEPS - 1}\n")
    damaged = output_dir / "checkpoints" / f"step-{STEPS - 1}" / OPTIM_STATES_RANK1
    _truncate(damaged)

    completed = _run("deepspeed", [*ARGS, "--deepspeed", str(ds_config), "--output_dir", str(output_dir)])
    assert completed.returncode == 0, completed.stderr[-5000:]
    warnings = [line for line in (completed.stdout + completed.stderr).splitlines() if "resuming from" in line]
    assert (
        len(warnings) == 1 and f"{damaged} is truncated" in warnings[0] and warnings[0].endswith(f"resuming from step-{STEPS - 2} instead")
    )
    assert json.loads((output_dir / "metrics.json").read_text())["resumed_from_step"] == STEPS - 2
    _same_adapters(output_dir, reference)
    verify_manifest(output_dir / "checkpoints" / f"step-{STEPS - 1}")  # saved again, whole
    assert (output_dir / "checkpoints" / "latest").read_text().strip() == f"step-{STEPS}"


@pytest.mark.slow
def test_a_save_into_a_full_disk_keeps_the_earlier_checkpoints(reference, ds_config, tmp_path):
    """checkpoints/ on a tmpfs with room for one and a half checkpoints: step 1 is saved, step 2 fills the
    disk midway. The run stops with one line, step 1 and ``latest`` are intact, no half checkpoint is left,
    and the next start (with room again) resumes from step 1 and ends where the uninterrupted run ends."""
    output_dir = tmp_path / "out"
    checkpoints = output_dir / "checkpoints"
    checkpoints.mkdir(parents=True)
    step_bytes = sum(path.stat().st_size for path in (reference / "checkpoints" / "step-1").iterdir())
    scripts = sum(path.stat().st_size for path in (reference / "checkpoints").iterdir() if path.is_file())
    size = (int(step_bytes * 1.5) + scripts + 64 * 4096) // 4096 * 4096
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(checkpoints)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full disk (needs root): {mounted.stderr.strip()}")
    try:
        args = [*ARGS, "--deepspeed", str(ds_config), "--output_dir", str(output_dir)]
        # --overwrite_output_dir: the mount point makes output_dir non-empty.
        command = _command("deepspeed", [*args, "--overwrite_output_dir"])
        failed = subprocess.run(command, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
        release_stale_shared_memory(command)
        output = failed.stdout + failed.stderr
        assert failed.returncode != 0, output[-3000:]
        reports = [line for line in output.splitlines() if "could not save checkpoint" in line]
        assert len(reports) == 1 and f"{checkpoints / 'step-2'}: rank" in reports[0], output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        assert (checkpoints / "latest").read_text().strip() == "step-1"
        verify_manifest(checkpoints / "step-1")
        assert sorted(path.name for path in checkpoints.iterdir() if path.is_dir()) == ["step-1"]  # no step-2, no scratch

        subprocess.run(["mount", "-o", "remount,size=64m", str(checkpoints)], check=True)
        resumed = _run("deepspeed", args)
        assert resumed.returncode == 0, resumed.stderr[-5000:]
        assert json.loads((output_dir / "metrics.json").read_text())["resumed_from_step"] == 1
        _same_adapters(output_dir, reference)
    finally:
        subprocess.run(["umount", str(checkpoints)], capture_output=True)
