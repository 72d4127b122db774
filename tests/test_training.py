"""The minibatch training loop of fso_lib.training."""
import math

import torch

from fso_lib.models import mlp
from fso_lib.training import evaluate, minibatches, sum_squared_error, train


def test_minibatches_visit_every_example_once_per_epoch():
    stream = minibatches(10, 5, torch.Generator().manual_seed(0))
    seen = torch.cat([next(stream), next(stream)])
    assert sorted(seen.tolist()) == list(range(10))


def test_sgd_loop_matches_a_hand_written_step():
    torch.manual_seed(0)
    net = mlp([3, 4, 2])
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    manual = mlp([3, 4, 2])
    manual.load_state_dict(net.state_dict())
    history = train(net, sum_squared_error, x, y, lr=0.1, n_steps=1, batch_size=8)
    loss = sum_squared_error(manual(x), y)
    grads = torch.autograd.grad(loss, list(manual.parameters()))
    for p, q, g in zip(net.parameters(), manual.parameters(), grads):
        torch.testing.assert_close(p, q - 0.1 * g)
    assert math.isclose(history.loss[0], float(loss), rel_tol=1e-6)


def test_training_lowers_the_loss_and_flags_divergence():
    torch.manual_seed(0)
    x = torch.randn(200, 5)
    y = x @ torch.randn(5, 2)
    history = train(mlp([5, 2]), sum_squared_error, x, y, lr=0.05, n_steps=100, batch_size=20,
                    eval_sets={"train": (x, y)}, eval_every=50)
    assert history.eval_loss["train"][-1] < 0.1 * history.eval_loss["train"][0]
    assert history.eval_steps == [0, 50, 100]
    exploding = train(mlp([5, 2]), sum_squared_error, x, y, lr=10.0, n_steps=200, batch_size=20)
    assert exploding.diverged and exploding.final_loss == math.inf
    assert evaluate(mlp([5, 2]), sum_squared_error, x, y) > 0
