"""pytest-benchmark entry points (thin: the workloads live in the bench_*.py scripts), plus the
check that the naive baseline takes the same step as the library.

    pytest benchmarks/ [--benchmark-only] [--benchmark-json FILE]
"""

import pytest
import torch

import rlora_kernels as rk
from benchmarks import bench_optimizer_step, bench_train_step, common, readme_perf, runner, shapes
from benchmarks.naive import NaiveRiemannion


def _step_pair(arch="minilm-l6", blocks=1, rank=4):
    """Two identical adapted stand-in models at a generic point (distinct singular values:
    from B = 0 the first direction has 2r equal singular values and SVD_r is not unique)."""
    out = []
    for _ in range(2):
        model = shapes.shape_model(arch, blocks)
        layers = rk.inject(model, shapes.target_names(arch), rank=rank, dtype=torch.float64)
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for layer in layers:
                q = torch.linalg.qr(torch.randn(layer.in_features, rank, generator=gen,
                                                dtype=torch.float64)).Q
                layer.lora_BR.copy_(q)
                layer.lora_B.copy_(q * torch.linspace(1.0, 0.2, rank, dtype=torch.float64))
        out.append((model, layers))
    return out


def _grads_from(layers, dense):
    """The gradients one backward would give for the dense layer gradients G: G B_R, G^T A_L
    (fixed noise would not do: the two implementations may pick different signs of B_R)."""
    for layer, g in zip(layers, dense):
        layer.lora_Z1.grad = g @ layer.lora_BR
        layer.lora_B.grad = g.T @ layer.lora_A


def test_naive_loop_takes_the_library_step():
    """Three steps (the first without momentum, then with it transported) give the same X."""
    (m1, l1), (_, l2) = _step_pair()
    gen = torch.Generator().manual_seed(3)
    riem = rk.Riemannion(m1, lr=0.05, momentum=0.9, weight_decay=0.1)
    naive = NaiveRiemannion(l2, lr=0.05, momentum=0.9, weight_decay=0.1)
    for _ in range(3):
        dense = [torch.randn(l.shape, generator=gen, dtype=torch.float64) for l in l1]
        _grads_from(l1, dense)
        _grads_from(l2, dense)
        riem.step()
        naive.step()
    for a, b in zip(l1, l2):
        x_lib, x_naive = a.delta_weight(), b.delta_weight()
        assert x_lib.norm() > 0
        torch.testing.assert_close(x_naive, x_lib, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["riemannion", "naive-loop", "adamw-foreach"])
def test_optimizer_step_minilm(benchmark, name):
    steps, _ = bench_optimizer_step.contenders("minilm-l6", rank=16, blocks=1, peft_too=False)
    step = steps[name][0]
    step()
    benchmark(step)


@pytest.mark.parametrize("method", bench_train_step.CONTENDERS)
def test_train_step_tiny_bert(benchmark, method):
    model, opt, loss_fn, batch = bench_train_step.prepare("tiny-bert", method)
    benchmark(lambda: bench_train_step.wl.train_step(model, opt, loss_fn, batch))


def test_summaries_and_paired_ratios():
    stats = common.summarize([0.001, 0.002, 0.003, 0.004, 0.005])
    assert stats == {"median": 3.0, "p20": 1.8, "p80": 4.2, "n": 5}
    r = common.ratio([2.0, 4.0, 6.0], [1.0, 1.0, 3.0])
    assert r["median"] == 4.0 / 1.0 and r["n"] == 3 and r["p20"] <= r["p80"]


def test_runner_reads_figures_of_other_layouts():
    doc = {"machine": {"cpu": "x"}, "rows": [
        {"op": "thin_qr", "rank": 16, "bucket": [6, 384, 384],
         "cpu": {"median_ms": 1.5, "q25_ms": 1.0, "q75_ms": 2.0}}]}
    (fig,) = runner.foreign_figures("cpu_compiled", doc)
    assert fig["name"] == "thin_qr,16,6x384x384/cpu"
    assert (fig["median"], fig["q25"], fig["q75"]) == (1.5, 1.0, 2.0)
    ours = {"figures": [{"name": "a", "median": 1.0, "unit": "ms"}]}
    assert runner.foreign_figures("x", ours)[0]["bench"] == "x"


def test_readme_markers():
    text = f"intro\n{readme_perf.START}\nold\n{readme_perf.END}\nrest\n"
    new = readme_perf.replace_between(text, "new\n")
    assert new == f"intro\n{readme_perf.START}\nnew\n{readme_perf.END}\nrest\n"
    assert readme_perf.replace_between("no markers", "new\n") is None
