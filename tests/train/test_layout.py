"""The trainer's package: its modules import in one direction, the step's inputs depend on
(seed, step) only, the config's rules come from pid_fast.checks, and the old module path works."""

import ast
import os
import warnings

import pytest
import torch

import pid_fast.train
from pid_fast.train.loop import draw_inputs, step_seed

TRAIN_DIR = os.path.dirname(pid_fast.train.__file__)


def _top_level_imports(path):
    """The pid_fast.train.<module> names that ``path`` imports at module level."""
    tree = ast.parse(open(path).read())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pid_fast.train."):
            found.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names if a.name.startswith("pid_fast.train."))
    return found


def test_train_modules_import_in_one_direction():
    modules = {name[:-3] for name in os.listdir(TRAIN_DIR) if name.endswith(".py") and name != "__init__.py"}
    graph = {m: _top_level_imports(os.path.join(TRAIN_DIR, m + ".py")) for m in modules}

    done, visiting = set(), []

    def visit(m):
        assert m not in visiting, f"import cycle: {' -> '.join(visiting + [m])}"
        if m in done:
            return
        visiting.append(m)
        for dep in graph.get(m, ()):
            visit(dep)
        visiting.pop()
        done.add(m)

    for m in sorted(modules):
        visit(m)
    assert "loop" not in graph["distributed"] and "loop" in graph["launch"]


def test_step_inputs_depend_on_seed_and_step_only():
    shape, gen = (3, 4, 4), torch.Generator()
    a = draw_inputs(gen, step_seed(0, 5), 8, shape, 250, 3, "cpu")
    torch.randn(100, generator=gen)  # whatever the generator did before
    b = draw_inputs(gen, step_seed(0, 5), 8, shape, 250, 3, "cpu")
    c = draw_inputs(gen, step_seed(0, 6), 8, shape, 250, 3, "cpu")
    d = draw_inputs(gen, step_seed(1, 5), 8, shape, 250, 3, "cpu")
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])
    noise, grid_indices, labels = a
    assert noise.shape == (8, *shape) and grid_indices.dtype == torch.int64
    assert int(grid_indices.min()) >= 0 and int(grid_indices.max()) < 250
    assert torch.equal(labels.sum(1), torch.ones(8))  # one-hot
    assert draw_inputs(gen, step_seed(0, 5), 8, shape, 250, 0, "cpu")[2] is None  # unconditional
    noise3, indices3, labels3 = draw_inputs(gen, step_seed(0, 5), 8, shape, 250, 3, "cpu", indices_per_noise=3)
    assert torch.equal(noise3, noise) and indices3.shape == (8, 3)  # the same noises, 3 points on each
    assert int(indices3.min()) >= 0 and int(indices3.max()) < 250 and labels3.shape == (8, 3)


@pytest.mark.parametrize("bad, message", [({"batch_size": True}, r"config\['batch_size'\] must be an int >= 1"),
                                          ({"seed": -1}, r"config\['seed'\] must be an int >= 0"),
                                          ({"loss": {"sigma_min": 90.0}}, "loss.sigma_min .* smaller than"),
                                          ({"loss": {"huber_c": 0.1}}, "huber_c is only used with norm='huber'"),
                                          ({"device": "tpu"}, r"config\['device'\] must be one of")])
def test_config_rules_come_from_checks(bad, message):
    with pytest.raises(ValueError, match=message):
        pid_fast.train.resolve_config(bad)


def test_old_module_path_still_works():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import pid_fast.training as old

    assert old.train is pid_fast.train.train and old.EMA is pid_fast.train.EMA
    assert old.resolve_config is pid_fast.train.resolve_config
    for name in pid_fast.train.__all__:
        assert getattr(old, name) is getattr(pid_fast.train, name)
