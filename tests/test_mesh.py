"""Device meshes: sharded runs equal the one-device run, checksum alarms, mesh-spec errors,
and two processes with `jax.distributed`.

The multi-device checks run in subprocesses (tests/mesh_worker.py): the simulated device count
must be set before jax starts, and this pytest process stays on one device. They are launched
together when the module's first test asks for them, and overlap.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from fm import integrity
from rftjax import parallel

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "mesh_worker.py")
MESHES = ("data:2,fsdp:4", "data:2,fsdp:2,tensor:2")
# fp32 metrics of the sharded runs against the one-device run: relative 1e-5, plus an absolute
# floor for quantities at rounding level (KL between two nearly equal policies is ~1e-8, and
# a different summation order moves it by as much as itself).
RTOL, ATOL = 1e-5, 1e-6
# Detector scores are z-scores over a few steps of a nearly flat toy run, i.e. differences
# divided by a tiny rolling σ: they amplify fp32 rounding of the statistics (which do agree
# to RTOL). 1e-3 σ is far below any alarm threshold; the flags themselves must be equal.
SCORE_ATOL = 1e-3


def _spawn(args, devices: int, log: str):
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env = {**os.environ, "XLA_FLAGS": flags.strip()}  # keeps conftest's compile flags
    with open(log, "w", encoding="utf-8") as f:
        return subprocess.Popen(
            [sys.executable, WORKER, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _wait(proc, log: str) -> None:
    try:
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 0:
        with open(log, encoding="utf-8") as f:
            tail = [line for line in f if "Involuntary full rematerialization" not in line]
        pytest.fail(f"{' '.join(proc.args[2:])} failed:\n{''.join(tail[-40:])}")


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mesh"))
    port = _free_port()
    procs = {"single": _spawn([out], 8, os.path.join(out, "single.log"))}
    for pid in (0, 1):  # two processes of 2 devices each, one coordinator
        args = [out, "--multiprocess", str(pid), "2", str(port)]
        procs[f"mp{pid}"] = _spawn(args, 2, os.path.join(out, f"mp{pid}.log"))
    yield out, procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def single(workers):
    out, procs = workers
    _wait(procs["single"], os.path.join(out, "single.log"))
    with open(os.path.join(out, "result.json"), encoding="utf-8") as f:
        return json.load(f)


def _assert_same_metrics(reference: list[dict], records: list[dict], evals=()) -> None:
    """`evals`: steps at which `records` alone hold an evaluation (a run's last step)."""
    assert [r["step"] for r in records] == [r["step"] for r in reference]
    for ref, rec in zip(reference, records, strict=True):
        extra = {"eval_accuracy", "eval_reward"} if rec["step"] in evals else set()
        assert rec.keys() == ref.keys() | extra
        for name, want in ref.items():
            atol = SCORE_ATOL if name.startswith("score/") else ATOL
            got = rec[name]
            assert abs(got - want) <= RTOL * abs(want) + atol, (ref["step"], name, want, got)
            if name.startswith("flag/") or name == "alarm":
                assert got == want, (ref["step"], name)


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_run_has_the_metrics_of_one_device(single, mesh):
    reference = single["runs"][""]
    assert len(reference) == 5 and any(r["reward_std"] > 0 for r in reference)  # real signal
    assert "kl_ref" in reference[0] and "score/grad_norm" in reference[0]  # fm statistics
    _assert_same_metrics(reference, single["runs"][mesh])


def test_a_run_resumes_on_another_mesh(single):
    # data:2,fsdp:4 for 3 steps, checkpoint, then data:2,fsdp:2,tensor:2 from the restore.
    _assert_same_metrics(single["runs"][""], single["remesh"], evals=(3,))


def test_a_second_step_on_the_mesh_does_not_recompile(single):
    assert single["compiles"] == dict.fromkeys(MESHES, 1)


def test_a_diverged_replica_raises_the_checksum_alarm(single):
    planted = single["planted"]
    alarms = [e for e in planted["events"] if e["signals"] == ["replica_checksum"]]
    assert alarms and alarms[0]["leaves"] == ["params.policy.model.norm.weight"]
    assert {"step": 0, "signals": ["replica_checksum"]} in planted["summary"]["alarms"]
    # The clean runs raised none.
    assert all(r.get("alarm", 0.0) == 0.0 for r in single["runs"][MESHES[0]])


def test_two_processes_train_save_restore_and_agree(workers, single):
    out, procs = workers
    for name in ("mp0", "mp1"):
        _wait(procs[name], os.path.join(out, f"{name}.log"))
    results = []
    for pid in (0, 1):
        with open(os.path.join(out, f"mp{pid}.json"), encoding="utf-8") as f:
            results.append(json.load(f))
    assert results[0]["steps"] == results[1]["steps"] == 5
    assert results[0]["checksums"] == results[1]["checksums"]  # the same weights everywhere
    workdir = os.path.join(out, "mp")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[:2] == ["3", "5"]
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    # 3 steps, save, restore, 2 more: the one-device run of 5 steps.
    _assert_same_metrics(single["runs"][""], records, evals=(3,))


@pytest.mark.parametrize(
    "spec,devices,message",
    [
        ("data:2,model:4", 8, "unknown axis 'model'; accepted: comma-separated axis:size"),
        ("data:2,fsdp:2", 8, "multiply to 4, but 8 devices are visible"),
        ("data=2", 8, "bad entry 'data=2'"),
        ("data:two", 8, "bad entry 'data:two'"),
        ("data:2,data:4", 8, "axis 'data' given twice"),
        ("data:0", 8, "size of 'data' must be >= 1"),
        ("data:-1,fsdp:3", 8, "8 devices are not divisible by 3"),
    ],
)
def test_bad_mesh_specs_name_the_problem(spec, devices, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parallel.parse_mesh(spec, devices)


def test_mesh_specs_parse_to_all_three_axes():
    assert parallel.parse_mesh("data:2,fsdp:4", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parallel.parse_mesh("fsdp:-1,tensor:2", 8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert parallel.parse_mesh("", 4) == {"data": 4, "fsdp": 1, "tensor": 1}
    assert parallel.parse_mesh("auto", 2) == {"data": 2, "fsdp": 1, "tensor": 1}


def test_partition_rules_follow_megatron_and_fsdp():
    mesh = AbstractMesh((2, 4, 2), parallel.AXES)
    layer = "params.policy.model.layers.0"
    cases = {
        # column-parallel: output rows on tensor, fsdp on the input dim
        f"{layer}.self_attn.q_proj.weight": ((64, 32), PartitionSpec("tensor", "fsdp")),
        f"{layer}.mlp.up_proj.weight": ((128, 32), PartitionSpec("tensor", "fsdp")),
        f"{layer}.self_attn.k_proj.bias": ((16,), PartitionSpec("tensor")),
        # row-parallel: input columns on tensor
        f"{layer}.self_attn.o_proj.weight": ((32, 64), PartitionSpec("fsdp", "tensor")),
        f"{layer}.mlp.down_proj.weight": ((32, 128), PartitionSpec("fsdp", "tensor")),
        # fsdp on the larger dimension; norms replicated; moments follow their parameters
        "params.policy.model.embed_tokens.weight": ((1000, 32), PartitionSpec("fsdp")),
        "opt_state.0.mu.policy.lm_head.weight": ((32, 1000), PartitionSpec(None, "fsdp")),
        f"{layer}.input_layernorm.weight": ((32,), PartitionSpec()),
        # not divisible by tensor (3 rows): that dimension stays whole
        f"{layer}.self_attn.v_proj.weight": ((3, 32), PartitionSpec(None, "fsdp")),
        # anything else (detector state, counters) is replicated
        "fm.detect.history": ((16, 8), PartitionSpec()),
    }
    for name, (shape, want) in cases.items():
        assert parallel.param_spec(name, shape, mesh) == want, name


def test_checksum_sees_one_flipped_bit_and_a_swap():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8)), jnp.float32)
    bits = np.asarray(x).view(np.uint32).copy()
    bits[1, 2] ^= 1
    flipped = jnp.asarray(bits.view(np.float32))
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
    c = integrity.checksum
    assert c(x) == c(jnp.array(x)) and c(x).dtype == jnp.uint32
    assert c(x) != c(flipped) and c(x) != c(swapped)
    assert c(jnp.ones(3, jnp.bfloat16)) != c(jnp.ones(3, jnp.float32))


def _reference_checksum(x) -> int:
    """Σ_i bits_i · (2i + 1) · 0x9E3779B1 mod 2³² over the row-major 32-bit words (16-bit
    values and booleans widened)."""
    x = np.asarray(x)
    if x.dtype == np.bool_ or x.dtype.itemsize == 2:
        words = x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint8).astype(np.uint64)
    else:
        words = x.view(np.uint32).astype(np.uint64)
    words = words.reshape(-1)
    weights = ((2 * np.arange(words.size, dtype=np.uint64) + 1) * 0x9E3779B1) % (1 << 32)
    return int(np.sum(words * weights % (1 << 32)) % (1 << 32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.bool_])
def test_checksum_matches_a_numpy_reference(dtype):
    # Leading axes of every kind: the halves (the second padded), then folds by halves.
    rng = np.random.default_rng(1)
    for shape in [(), (1,), (7,), (3, 5, 2), (1, 9), (6, 130), (5, 3, 3, 2), (64, 128), (2, 1),
                  (9, 1, 4), (17, 3)]:  # fmt: skip
        x = rng.normal(size=shape) * 100
        x = jnp.asarray(x > 0 if dtype == jnp.bool_ else x, dtype)
        assert int(integrity.checksum(x)) == _reference_checksum(x), shape
        assert int(jax.jit(integrity.checksum)(x)) == _reference_checksum(x), shape


@pytest.mark.parametrize("by_shape", [True, False])
def test_tree_checksum_is_the_checksum_of_the_leaf_checksums(by_shape):
    rng = np.random.default_rng(2)
    shapes = [(3, 4), (5,), (), (3, 4), (2, 2, 2), (5,), (), (40, 3), (40, 3)]  # repeated shapes
    leaves = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
    leaves[4] = leaves[4].astype(jnp.bfloat16)
    sums = np.array([_reference_checksum(x) for x in leaves], np.uint32)
    fingerprint = jax.jit(lambda t: integrity.tree_checksum(t, by_shape=by_shape))
    assert int(fingerprint(leaves)) == _reference_checksum(sums)
    t = lambda tree: integrity.tree_checksum(tree, by_shape=by_shape)  # noqa: E731
    a, b = jnp.ones((2, 2)), jnp.zeros((2, 2))
    assert t({"a": a, "b": b}) == t({"a": jnp.array(a), "b": jnp.array(b)})
    assert t({"a": a, "b": b}) != t({"a": b, "b": a})  # swapped leaves of one shape
    assert t({"a": a, "b": b}) != t({"a": a, "b": b.at[1, 1].set(1e-30)})
    assert int(t([])) == 0


def test_replica_mismatch_compares_along_the_replica_axes_only():
    spec = PartitionSpec("fsdp")  # mesh (data 2, fsdp 2): replicas along data
    axes = integrity.replicated_axes(spec, ("data", "fsdp"))
    assert axes == (0,)
    same = jnp.array([[1, 2], [1, 2]], jnp.uint32)  # two blocks, each copied twice
    assert not integrity.replica_mismatch(same, axes)
    assert integrity.replica_mismatch(same.at[1, 1].set(7), axes)
    assert not integrity.replica_mismatch(same, ())  # fully sharded: nothing to compare


def test_one_device_integrity_check_runs_in_process():
    mesh = parallel.make_mesh("", jax.devices()[:1])
    tree = parallel.place_state({"model": {"norm": {"weight": jnp.ones(4)}}}, mesh)
    assert parallel.diverged(parallel.make_integrity_check(mesh)(tree)) == []


def test_collectives_are_counted_by_kind_in_hlo_text():
    hlo = """
  %all-reduce.1 = f32[] all-reduce(f32[] %x), replica_groups={{0,1}}, to_apply=%add
  %ags = (f32[4], f32[8]) all-gather-start(f32[4] %y), dimensions={0}
  %agd = f32[8] all-gather-done((f32[4], f32[8]) %ags)
  %cp = f32[4] collective-permute(f32[4] %z), source_target_pairs={{0,1},{1,0}}
  %rs = f32[2] reduce-scatter(f32[4] %w), dimensions={0}, to_apply=%add
  %not = f32[4] add(f32[4] %all-reduce.1, f32[4] %w)
"""
    assert parallel.collective_counts(hlo) == {
        "all-reduce": 1,
        "all-gather": 1,
        "reduce-scatter": 1,
        "collective-permute": 1,
        "all-to-all": 0,
    }


def test_train_config_accepts_a_mesh_and_names_a_bad_one(tmp_path):
    from rftjax.config import TrainConfig

    assert TrainConfig(workdir=str(tmp_path), mesh="data:2,fsdp:4").mesh == "data:2,fsdp:4"
    with pytest.raises(ValueError, match="unknown axis 'model'"):
        TrainConfig(workdir=str(tmp_path), mesh="data:2,model:4")
