"""Multi-process training (issue 5): `scripts/train.py` as 2 `jax.distributed` processes on
localhost (CPU, one device each) gives the same per-step losses as 1 process with 2 devices.

Each process loads its own shard (perm[p::2], batch_size // 2 rows), so a global batch holds
the same examples as the 1-process batch (in another row order); the SFT loss is a
token-weighted mean over the global batch, so it agrees to float rounding. Each process picks
the sequence bucket for its own rows; `run_setup.agree_length` pads them all to the longest, which
is the bucket the 1-process run picks for the whole batch (second test). Children run in
their own process groups and are killed on failure or timeout, so a peer left waiting in a
collective cannot hang the suite.
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # per _run_all (~60 s measured on a busy 2-core CPU)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "TPU_"))}
    # The session's compile cache (conftest): the job's processes compile the same programs
    # and the rerun after a preemption compiles nothing.
    env.update({k: os.environ[k] for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")})
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _cmd(workdir, steps: int = 3, extra=()) -> list:
    return [sys.executable, os.path.join(ROOT, "scripts", "train.py"),
            "--config", os.path.join(ROOT, "configs", "tiny_sft.py"), f"--config.workdir={workdir}",
            f"--config.train.max_steps={steps}", "--config.log.tensorboard=False", "--config.data.workers=0",
            "--config.checkpoint.every=100", "--config.data.num_buckets=1", *extra]


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the child and anything it started
        except ProcessLookupError:
            pass
    proc.wait()


def _run_all(runs: list, logdir, on_poll=None) -> None:
    """Runs `(cmd, env)` pairs concurrently; any failure or the timeout kills all and fails.
    `on_poll(procs)` runs at every poll (e.g. to send a signal once something happened)."""
    os.makedirs(logdir, exist_ok=True)
    procs, logs, failed = [], [], []
    try:
        for i, (cmd, env) in enumerate(runs):
            log = open(os.path.join(logdir, f"process_{i}.log"), "wb")
            logs.append(log)
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed or all(c == 0 for c in codes):
                break
            if time.monotonic() > deadline:
                failed = [i for i, c in enumerate(codes) if c is None]
                break
            if on_poll is not None:
                on_poll(procs)
            time.sleep(0.05)
    finally:
        for p in procs:
            _kill(p)
        for log in logs:
            log.close()
    if failed:
        tails = []
        for i in failed:
            with open(os.path.join(logdir, f"process_{i}.log"), errors="replace") as f:
                tails.append(f"--- {' '.join(map(str, runs[i][0][1:]))} (rc={procs[i].returncode}):\n" + f.read()[-3000:])
        pytest.fail("run failed or timed out\n" + "\n".join(tails))


def _losses(workdir) -> list:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _distributed(cmd: list, count: int = 2) -> list:
    """`count` copies of `cmd` as one jax.distributed job on localhost, one CPU device each."""
    coordinator = f"127.0.0.1:{_free_port()}"
    return [(cmd + [f"--coordinator={coordinator}", f"--num_processes={count}", f"--process_id={i}"], _env(1))
            for i in range(count)]


@pytest.mark.slow
def test_preempted_two_process_run_resumes_to_the_one_process_losses(tmp_path):
    """The 2-process job and a 1-process, 2-device run side by side; SIGTERM reaches process 1
    of the job only (a preempted host). Both processes agree on one step (JAX's preemption
    service, via orbax), save it together and exit 0; the rerun resumes there, and every
    step's loss equals the 1-process run's."""
    # The signal goes once 2 steps are logged; measured alone, the job then saved step 7. 24
    # steps leave room for a busier CPU; each step of the 2-process job costs ~0.4 s (its
    # collectives go over localhost gRPC), so a longer run only adds time.
    steps, single, multi = 24, tmp_path / "single", tmp_path / "multi"
    sent = []

    def preempt_process_1(procs):
        metrics = multi / "metrics.jsonl"
        if not sent and metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            procs[2].send_signal(signal.SIGTERM)  # [single, job process 0, job process 1]
            sent.append(True)

    _run_all([(_cmd(single, steps), _env(2)), *_distributed(_cmd(multi, steps))], tmp_path / "logs",
             on_poll=preempt_process_1)
    assert sent, "the job finished before it could be preempted"
    saved = []
    for i in (1, 2):
        text = (tmp_path / "logs" / f"process_{i}.log").read_text(errors="replace")
        saved += [int(m) for m in re.findall(r"preemption: saved step (\d+)", text)]
    assert len(saved) == 2 and saved[0] == saved[1] < steps, saved  # one step, both processes
    assert os.path.isdir(multi / "checkpoints" / str(saved[0]))
    assert len(_losses(multi)) == saved[0]  # logged up to the saved step, not beyond

    _run_all(_distributed(_cmd(multi, steps)), tmp_path / "logs_resumed")
    single_losses, multi_losses = _losses(single), _losses(multi)
    assert len(single_losses) == len(multi_losses) == steps  # every step once
    np.testing.assert_allclose(multi_losses, single_losses, rtol=0, atol=1e-5)


def _stage_cmd(config: str, workdir, steps: int, *extra) -> list:
    buckets = () if config.startswith("tiny_ppo") else ("--config.data.num_buckets=1",)  # PPO has no buckets
    return [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--config", os.path.join(ROOT, "configs", config),
            f"--config.workdir={workdir}", f"--config.train.max_steps={steps}", "--config.requires=",
            "--config.log.tensorboard=False", "--config.data.workers=0", *buckets, *extra]


def _records(workdir, drop=("seconds", "_per_s", "mfu")) -> list:
    """metrics.jsonl without the wall-time figures."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if not any(d in k for d in drop)} for line in f]


def _assert_same_records(multi: list, single: list, atol: float) -> None:
    assert len(multi) == len(single) and [r.keys() for r in multi] == [r.keys() for r in single]
    for m, s in zip(multi, single):
        for key in s:
            np.testing.assert_allclose(m[key], s[key], rtol=1e-5, atol=atol, err_msg=f"step {s['step']}: {key}")


@pytest.mark.slow
def test_rm_evaluation_on_two_processes_equals_one_process(tmp_path):
    """Held-out RM metrics of the 2-process job equal the 1-process, 2-device run's: each
    batch's global means weigh by its global count of pairs. 22 held-out pairs in global
    batches of 4: the last batch holds 2 real pairs (1 per process, each padded)."""
    extra = ("--config.model.init=tiny", "--config.train.batch_size=4", "--config.data.eval_size=22",
             "--config.rm.eval_every=2", "--config.checkpoint.every=100")
    single, multi = tmp_path / "single", tmp_path / "multi"
    _run_all([(_stage_cmd("tiny_rm.py", single, 2, *extra), _env(2)),
              *_distributed(_stage_cmd("tiny_rm.py", multi, 2, *extra))], tmp_path / "logs")
    single_rows, multi_rows = _records(single), _records(multi)
    assert single_rows[-1]["eval_pairs"] == multi_rows[-1]["eval_pairs"] == 22
    assert "eval_accuracy" in multi_rows[-1]
    _assert_same_records(multi_rows, single_rows, atol=1e-5)


def _random_ppo_world(root) -> tuple[str, str]:
    """A random tiny base and a random reward adapter (LoRA + head) over it."""
    import jax

    from llava_jax.models import heads, lora as lora_lib
    from llava_jax.models.weights import save_checkpoint, write_adapter_dir
    from llava_jax.models.llava import init_params, tiny_config

    config = tiny_config()
    base = jax.device_get(init_params(config, jax.random.PRNGKey(3)))
    save_checkpoint(os.path.join(root, "base"), config, base)
    adapter = lora_lib.init_adapter(base, lora_lib.LoraConfig(rank=4, alpha=8.0), jax.random.PRNGKey(4))
    write_adapter_dir(os.path.join(root, "reward"), adapter,
                      heads.init_head("reward", config.text.hidden_size, jax.random.PRNGKey(5)), "reward")
    return os.path.join(root, "base"), os.path.join(root, "reward")


@pytest.mark.slow
def test_ppo_steps_on_two_processes_equal_one_process(tmp_path):
    """Two PPO steps (rollout, scoring, the reward model's inputs built on each host, updates)
    of the 2-process job equal the 1-process, 2-device run's, metric for metric: each process
    holds its block of the global batch, and per-row draws follow the global row."""
    base, reward = _random_ppo_world(str(tmp_path))
    extra = (f"--config.model.init={base}", f"--config.ppo.reward_adapter={reward}", "--config.eval.toy_dir=",
             "--config.ppo.rollout_batch=8", "--config.ppo.step_batch=4", "--config.ppo.response_len=8",
             "--config.checkpoint.every=100")
    single, multi = tmp_path / "single", tmp_path / "multi"
    _run_all([(_stage_cmd("tiny_ppo.py", single, 2, *extra), _env(2)),
              *_distributed(_stage_cmd("tiny_ppo.py", multi, 2, *extra))], tmp_path / "logs")
    single_rows, multi_rows = _records(single), _records(multi)
    assert len(single_rows) == 2 and single_rows[0]["response_length"] > 0
    _assert_same_records(multi_rows, single_rows, atol=1e-4)


# --- processes that bucket their own rows differently still build one global batch -------
# batch 4 (2 rows per process), buckets (40, 72, 144): at step 3 process 1's rows fit 72 and
# process 0's need 144; unpadded, the processes would run differently shaped collectives.
BUCKET_STEPS = 4


def _bucket_config():
    from configs.tiny_sft import get_config

    cfg = get_config()
    cfg.train.batch_size, cfg.data.max_length = 4, 144
    cfg.data.workers = 0
    return cfg


def _bucket_child(out: str) -> None:
    """One process of the 2-process job: the global input_ids and every process's own bucket."""
    import jax
    from jax.experimental import multihost_utils

    from llava_jax import sharding
    from llava_jax.models.llava import tiny_config
    from llava_jax.sharding import batch_to_device
    from llava_jax.train.setup import agree_length
    from llava_jax.settings import RunSettings
    from llava_jax.train.loop import build_data

    loader, _, _ = build_data(RunSettings.from_config(_bucket_config()), tiny_config())
    mesh = sharding.make_mesh((1, -1, 1))
    steps = []
    for _ in range(BUCKET_STEPS):
        local = next(loader)
        own = multihost_utils.process_allgather(np.asarray([local["input_ids"].shape[-1]]))
        batch = batch_to_device(agree_length(local, loader), mesh)
        ids = multihost_utils.process_allgather(batch["input_ids"], tiled=True)
        steps.append({"own_lengths": np.asarray(own).ravel().tolist(), "input_ids": np.asarray(ids).tolist()})
    if jax.process_index() == 0:
        with open(out, "w") as f:
            json.dump(steps, f)


def test_processes_agree_on_the_bucket_of_the_global_batch(tmp_path):
    from llava_jax.models.llava import tiny_config
    from llava_jax.settings import RunSettings
    from llava_jax.train.loop import build_data

    out = tmp_path / "steps.json"
    _run_all(_distributed([sys.executable, os.path.abspath(__file__), f"--out={out}"]), tmp_path / "logs")
    with open(out) as f:
        steps = json.load(f)
    os.chdir(ROOT)
    loader, _, _ = build_data(RunSettings.from_config(_bucket_config()), tiny_config())  # this process alone: the whole batch
    mixed = 0
    for step in steps:
        whole = next(loader)["input_ids"]
        ids = np.asarray(step["input_ids"])
        mixed += len(set(step["own_lengths"])) > 1
        assert ids.shape == whole.shape  # the bucket one process picks for the whole batch
        # the same examples (rows come process by process: p takes every 2nd of the batch)
        assert sorted(map(tuple, ids.tolist())) == sorted(map(tuple, whole.tolist()))
    loader.close()
    assert mixed, "no step had processes picking different buckets: the case is not exercised"


if __name__ == "__main__":  # a child of test_processes_agree_on_the_bucket_of_the_global_batch
    from absl import app, flags

    flags.DEFINE_string("out", None, "where process 0 writes the steps (JSON)")
    flags.DEFINE_string("coordinator", None, "HOST:PORT")
    flags.DEFINE_integer("num_processes", None, "")
    flags.DEFINE_integer("process_id", None, "")

    def _main(argv):
        import jax

        sys.path.insert(0, ROOT)
        F = flags.FLAGS
        jax.distributed.initialize(F.coordinator, F.num_processes, F.process_id)
        _bucket_child(F.out)

    app.run(_main)
