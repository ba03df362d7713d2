"""Tests for ``--device`` (fedseq.device): name checks, resolution that fails fast for hardware
this process lacks, the config and worker plumbing, and (marked ``gpu``, run where torch sees a
GPU) per-user updates and evaluation on CUDA equal to the CPU's within float tolerance."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from fedseq.config import ConfigError, ExperimentConfig
from fedseq.device import DeviceError, check_name, model_on, resolve
from fedseq.metrics import EvalConfig, Evaluator
from fedseq.models import build_model
from fedseq.models.common import reference_init
from fedseq.params import get_vector
from fedseq.training import LocalConfig, compute_updates

HAS_CUDA = torch.cuda.is_available()
# `-m gpu` selects them; without CUDA they skip with the reason
gpu = pytest.mark.skipif(not HAS_CUDA, reason="torch sees no CUDA device on this machine")


def _gpu(f):
    return pytest.mark.gpu(gpu(f))


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_well_formed_names_pass_the_check(name):
    check_name(name)  # Execute / Assert: no error


@pytest.mark.parametrize("name", ["", "gpu", "CUDA", "cuda:", "cuda:x", "tpu", "cpu:0 "])
def test_malformed_names_are_refused_with_the_accepted_ones(name):
    with pytest.raises(DeviceError, match="auto, cpu, cuda or cuda:N"):
        check_name(name)


def test_auto_resolves_to_what_this_machine_has_and_cpu_to_the_cpu():
    # Execute / Assert
    assert resolve("auto") == torch.device("cuda" if HAS_CUDA else "cpu")
    assert resolve("cpu") == torch.device("cpu")


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_fails_fast_saying_why():
    with pytest.raises(DeviceError, match="requested but .*use --device cpu or auto"):
        resolve("cuda")


def test_the_config_carries_the_device_into_local_training_and_evaluation():
    # Prepare / Execute
    cfg = ExperimentConfig(device="cpu")

    # Assert
    assert ExperimentConfig().device == "auto"
    assert cfg.local().device == "cpu"
    with pytest.raises(ConfigError, match="device must be"):
        ExperimentConfig(device="gpu")
    with pytest.raises(ValueError, match="device must be"):
        EvalConfig(device="gpu")


def test_the_cpu_uses_the_model_itself_and_a_device_copy_is_made_once():
    model = build_model("sasrec", 10, hidden=8, heads=2, ffn=16, max_len=6)
    assert model_on(model, torch.device("cpu")) is model
    if HAS_CUDA:
        dev = torch.device("cuda")
        assert model_on(model, dev) is model_on(model, dev) and next(model_on(model, dev).parameters()).is_cuda


@pytest.mark.slow  # seconds of processes, waits or compute: `make test` runs it, `make test-fast` skips it
@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_a_worker_asked_for_cuda_without_a_gpu_exits_with_the_reason(zygote, tmp_path):
    # Execute: a real worker process, forked as `fedseq run` forks it (it fails before it
    # registers, so no orchestrator is needed)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDSEQ_")}
    proc = zygote.spawn("client-0", ["serve-client", "--orchestrator", "127.0.0.1:1", "--insecure", "--device",
                                     "cuda"], env, tmp_path / "client-0.log")

    # Assert
    assert proc.wait(120) != 0
    log = (tmp_path / "client-0.log").read_text()
    assert "device 'cuda' requested but" in log, log[-2000:]


def _tiny(name: str):
    extra = {"input_len": 8} if name == "bert4rec" else {}
    model = build_model(name, 20, hidden=8, heads=2, ffn=16, max_len=10, **extra)
    reference_init(model, 1)
    return model


def _seqs() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.choice(np.arange(1, 21), size=n, replace=False).astype(np.int64) for n in (2, 4, 7, 13, 3, 9)]


@_gpu
@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
@pytest.mark.parametrize("mode", ["paper", "fedavg"])
def test_updates_on_the_gpu_equal_the_cpus(name, mode):
    # Prepare
    model = _tiny(name)
    params = get_vector(model)
    users = [5, 0, 42, 7, 1000, 3]
    base = LocalConfig(mode=mode, local_epochs=2)

    # Execute
    cpu = compute_updates(model, params, _seqs(), users, 3, 17, dataclasses.replace(base, device="cpu"))
    gpu_ = compute_updates(model, params, _seqs(), users, 3, 17, dataclasses.replace(base, device="cuda"))

    # Assert: same users, same sparsity, values equal within float32 summation-order noise
    assert not gpu_.updates.is_cuda
    torch.testing.assert_close(gpu_.updates, cpu.updates, rtol=1e-4, atol=1e-5)
    assert torch.equal(gpu_.updates != 0, cpu.updates != 0) or mode == "fedavg"
    np.testing.assert_allclose(gpu_.losses, cpu.losses, rtol=1e-5)


@_gpu
@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
@pytest.mark.parametrize("protocol", ["sampled", "full"])
def test_evaluation_on_the_gpu_equals_the_cpus(name, protocol):
    # Prepare
    model = _tiny(name)
    seqs = _seqs()
    test = np.array([int(np.setdiff1d(np.arange(1, 21), s)[0]) for s in seqs], dtype=np.int64)
    users = np.arange(len(seqs))

    def run(device: str):
        ev = Evaluator(model, seqs, test, users, [19], EvalConfig(protocol=protocol, num_negatives=10, device=device))
        return ev(get_vector(model))

    # Execute
    cpu, gpu_ = run("cpu"), run("cuda")

    # Assert
    assert gpu_.users == cpu.users
    assert gpu_.hr10 == pytest.approx(cpu.hr10) and gpu_.ndcg10 == pytest.approx(cpu.ndcg10, abs=1e-9)


def test_a_workers_evaluation_keeps_the_runs_eval_config_and_its_device(redis_url, monkeypatch):
    """A worker evaluates with the run's whole evaluation config on its own device (its --device
    wins over the run's, client/app.py); only the protocol may come from the request. Before, the
    worker rebuilt the config and dropped the device (and batch sizes): evaluation ran on the CPU."""
    from client.service import benign_population
    from client.worker import ModelSource, WorkerTasks
    from fedseq.store import RedisStore
    from fedseq.v1 import worker_pb2

    # Prepare: a hosted population whose run evaluation config is not the default one
    cfg = ExperimentConfig(run_id="evaldev", dataset="synthetic:users=12,items=30,max_length=10", num_negatives=10)
    hosted = benign_population(cfg, None)
    s = hosted.setup
    RedisStore.from_url(redis_url, cfg.run_id).put_model(0, s.layout.unflatten(s.initial_params()))
    run_eval = dataclasses.replace(s.eval_config(), device="cpu", batch_size=7, max_tokens=99)
    monkeypatch.setattr(type(s), "eval_config", lambda self: run_eval)
    w = WorkerTasks("w")
    w.attach(cfg.run_id, hosted, ModelSource(cfg.run_id, redis_url, ""), "127.0.0.1:1")
    # Execute
    w.Evaluate(worker_pb2.EvaluateRequest(run_id=cfg.run_id, model_version=0, users=[0, 1, 2], protocol="full"))
    # Assert
    (key,) = w._evaluators
    assert key[1] == dataclasses.replace(run_eval, protocol="full")
