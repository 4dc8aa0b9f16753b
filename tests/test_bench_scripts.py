"""The benchmark scripts on tiny shapes on the CPU: `scripts/bench_ppo.py --vs-hf` (our PPO
step against the PyTorch reference of scripts/torch_ppo_reference.py: the same rollout gives
the same scores, advantages, losses and gradient norms on both sides, and the ratio line is
printed) and `scripts/bench_gpu.py --tiny` (every section runs, so the script works the first
time a GPU is there)."""
import re

import numpy as np
import pytest

# bench_ppo's tiny --vs-hf shapes, also bench_gpu --tiny's PPO section's.
PPO_ARGS = ["--rollout-batch", "4", "--step-batch", "2", "--response-len", "8"]
# The original's '?' cut with a fifth of the vocabulary as '?': most responses end early, so
# the check sees pad positions (their values enter the value loss, their log-probs must not count).
CUT_ARGS = ["--cut-ids", ",".join(str(i) for i in range(3, 103))]


@pytest.mark.slow
@pytest.mark.parametrize("cpu_shapes", ["on", "off"])  # off: the TPU/GPU forms, on this CPU
def test_bench_ppo_vs_hf_agrees_and_prints_the_ratio(capsys, cpu_shapes):
    from scripts.bench_ppo import main

    main(["--vs-hf", *PPO_ARGS, *CUT_ARGS, "--rounds", "1", "--cpu-shapes", cpu_shapes])  # exits 1 on a difference
    out = capsys.readouterr().out
    assert f"cpu_shapes={cpu_shapes};" in out, out
    first = float(re.search(r"the first rollout: ([\d.]+) tokens", out).group(1))
    assert first < 7.0, out  # pads in the checked rollout
    assert "check (rtol 0.0001, atol 0.0001): PASS" in out, out
    assert "FAIL" not in out, out
    for phase in ("| sampling", "| scoring", "| update", "| PPO step"):
        assert re.search(re.escape(phase) + r"[^|]*\| [\d.]+ \| [\d.]+ \| [\d.]+x \|", out), (phase, out)
    assert re.fullmatch(r"ppo step ours/hf: \d+\.\d\dx", out.strip().splitlines()[-1]), out


def test_bench_ppo_check_fails_on_a_difference():
    from scripts.bench_ppo import CHECKED, check_vs_torch

    ours = {k: np.linspace(-1.0, 1.0, 6) if k in ("values", "advantages") else np.float64(1.5) for k in CHECKED}
    ours["logprobs"] = ours["ref_logprobs"] = np.linspace(-3.0, -1.0, 6)
    ours["response_mask"] = np.arange(6) < 4
    assert check_vs_torch(ours, dict(ours), tight=True)[0]
    for key in ("advantages", "value_grad_norm", "ref_logprobs"):
        theirs = {**ours, key: ours[key] * (1 + 1e-3)}
        ok, lines = check_vs_torch(ours, theirs, tight=True)
        assert not ok and lines[-1].endswith("FAIL") and f"{key}" in " ".join(lines)
    # a pad's log-prob is a convention (0 in the original, anything in ours): not compared
    theirs = {**ours, "ref_logprobs": np.where(ours["response_mask"], ours["ref_logprobs"], 0.0)}
    assert check_vs_torch(ours, theirs, tight=True)[0]


@pytest.mark.slow
def test_bench_gpu_tiny_runs_every_section(capsys):
    from scripts.bench_gpu import main

    main(["--tiny", "--steps", "1", "--ppo-layers", "1", *PPO_ARGS])  # 1 of 2 layers: the 7B run's layer cut
    out = capsys.readouterr().out
    assert "(1 of 2 layers)" in out, out
    for name in ("(a) LoRA SFT step", "(b) decode", "(c) PPO step"):
        row = next((line for line in out.splitlines() if line.startswith(f"| {name} |")), None)
        assert row is not None and "FAILED" not in row, out
    assert re.search(r"tokens/s", out) and re.search(r"of the HBM bound", out)
    t = r"[\d.]+ m?s \(\d+%\)"
    assert re.search(rf"sampling {t}, scoring {t}, update {t}", out), out
