"""The minibatch training loop of fso_lib.training."""
import math

import torch

from fso_lib.models import mlp
from fso_lib.training import evaluate, minibatches, sum_squared_error, train, training_step


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


class _RecordingSGD(torch.optim.SGD):
    """SGD that asks for a statistics minibatch every third update, like the chapter-6 optimizers."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.n_steps, self.statistics = 0, []

    def needs_statistics(self):
        return self.n_steps % 3 == 0

    def update_statistics(self, x):
        self.statistics.append((self.n_steps, x.clone()))

    def step(self, closure=None):
        self.n_steps += 1
        return super().step(closure)


def test_train_feeds_statistics_minibatches_through_the_shared_step():
    torch.manual_seed(0)
    x, y = torch.randn(40, 3), torch.randn(40, 2)
    net = mlp([3, 4, 2])
    optimizer = _RecordingSGD(net.parameters(), lr=0.1)
    history = train(net, sum_squared_error, x, y, optimizer=optimizer, n_steps=7, batch_size=10)
    assert [n for n, _ in optimizer.statistics] == [0, 3, 6] and len(history.loss) == 7
    assert all(s.shape == (10, 3) for _, s in optimizer.statistics)
    # a second, independent stream: not the training minibatches of those updates
    first_batch = x[next(minibatches(40, 10, torch.Generator().manual_seed(0)))]
    assert not torch.equal(optimizer.statistics[0][1], first_batch)


def test_training_step_returns_the_detached_loss_and_updates_once():
    torch.manual_seed(1)
    net, x, y = mlp([3, 4, 2]), torch.randn(8, 3), torch.randn(8, 2)
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = training_step(net, sum_squared_error, optimizer, x, y)
    assert loss.dim() == 0 and not loss.requires_grad
    assert math.isclose(float(loss), float(sum_squared_error(mlp_copy(before, net)(x), y)), rel_tol=1e-6)
    assert any(not torch.equal(b, p) for b, p in zip(before, net.parameters()))


def mlp_copy(parameters, like):
    copy = mlp([3, 4, 2])
    with torch.no_grad():
        for p, value in zip(copy.parameters(), parameters):
            p.copy_(value)
    return copy
