"""NT-Xent, distributed equivalence, training, resume and frozen-feature evaluation."""

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from course_utils.data.shapes import ShapesWorld
from course_utils.models import SimCLRModel, resnet
from course_utils.data.datasets import ImageTensorDataset
from course_utils.simclr import (
    extract_features, knn_accuracy, linear_probe, nt_xent, random_linear_head, supervised_accuracy, train_simclr,
)


def nt_xent_loop(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Independent reference: one anchor at a time, straight from the formula."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    n, batch = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):
        j = (i + batch) % n
        numerator = torch.exp(z[i] @ z[j] / temperature)
        denominator = sum(torch.exp(z[i] @ z[k] / temperature) for k in range(n) if k != i)
        total = total - torch.log(numerator / denominator)
    return total / n


@pytest.mark.parametrize("batch, dim, temperature", [(1, 2, 0.5), (3, 16, 0.1), (8, 5, 1.0), (16, 32, 0.2)])
def test_nt_xent_matches_a_per_anchor_loop(batch, dim, temperature):
    g = torch.Generator().manual_seed(batch * dim)
    z1, z2 = torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)
    assert torch.allclose(nt_xent(z1, z2, temperature).double(), nt_xent_loop(z1, z2, temperature), atol=1e-5)


def test_nt_xent_is_symmetric_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    assert torch.allclose(nt_xent(z1, z2), nt_xent(z2, z1), atol=1e-6)
    assert torch.allclose(nt_xent(3 * z1, 0.5 * z2), nt_xent(z1, z2), atol=1e-6)


def test_nt_xent_has_finite_gradients_for_identical_views():
    z = torch.randn(4, 8, requires_grad=True)
    loss = nt_xent(z, z.clone())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    single = torch.randn(1, 3, requires_grad=True)
    nt_xent(single, single).backward()
    assert torch.isfinite(single.grad).all()


def test_nt_xent_rejects_bad_input():
    with pytest.raises(ValueError, match="equal shape"):
        nt_xent(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.randn(4, 8), torch.randn(4, 8), temperature=0)


WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from course_utils.simclr import nt_xent
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 4)
    x1, x2 = torch.randn(8, 6), torch.randn(8, 6)  # the full batch; each process takes its half
    shard = slice(rank * 4, rank * 4 + 4)
    loss = nt_xent(head(x1[shard]), head(x2[shard]), 0.3)
    loss.backward()
    for p in head.parameters():  # what DDP does: average the gradients
        dist.all_reduce(p.grad)
        p.grad /= world
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    if rank == 0:
        json.dump({"loss": mean_loss.item() / world, "grad": head.weight.grad.flatten().tolist()}, open(sys.argv[1], "w"))
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_two_processes(source: str, script: Path, argument: Path) -> None:
    """Run ``source`` as a script under ``torchrun --nproc_per_node=2`` (gloo on the CPU)."""
    script.write_text(source)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
               "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), str(argument)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]


def test_two_torchrun_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    result = tmp_path / "result.json"
    _torchrun_two_processes(WORKER, tmp_path / "worker.py", result)
    distributed = json.loads(result.read_text())
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 4)
    x1, x2 = torch.randn(8, 6), torch.randn(8, 6)
    loss = nt_xent(head(x1), head(x2), 0.3)
    loss.backward()
    assert abs(distributed["loss"] - loss.item()) < 1e-5
    assert torch.allclose(torch.tensor(distributed["grad"]), head.weight.grad.flatten(), atol=1e-5)


TRAIN_WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    from course_utils.data.shapes import ShapesWorld
    from course_utils.models import SimCLRModel, resnet
    from course_utils.simclr import train_simclr
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = SimCLRModel(resnet(10, 4), proj_dim=8)
    history = train_simclr(model, ShapesWorld(n=256, seed=0), epochs=2, batch_size=32, temperature=0.2,
                           progress=False, device="cpu", checkpoint=sys.argv[1] + "/state.pt")
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(weights) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, weights)
    if dist.get_rank() == 0:
        same = all(torch.equal(gathered[0], w) for w in gathered)
        json.dump({"loss": history.loss, "same_weights": same}, open(sys.argv[1] + "/train.json", "w"))
    dist.destroy_process_group()
""")


def test_train_simclr_runs_unchanged_under_torchrun_with_two_processes(tmp_path):
    _torchrun_two_processes(TRAIN_WORKER, tmp_path / "train_worker.py", tmp_path)
    result = json.loads((tmp_path / "train.json").read_text())
    assert result["same_weights"], "DDP must keep the replicas identical"
    assert len(result["loss"]) == 2 and all(math.isfinite(loss) for loss in result["loss"])
    assert (tmp_path / "state.pt").is_file()


@pytest.fixture(scope="module")
def tiny_world() -> ShapesWorld:
    return ShapesWorld(n=512, seed=0, difficulty="easy")


def _tiny_model() -> SimCLRModel:
    torch.manual_seed(0)
    return SimCLRModel(resnet(10, 8), proj_dim=16)


def test_a_short_training_run_lowers_the_loss(tiny_world):
    history = train_simclr(_tiny_model(), tiny_world, epochs=4, batch_size=64, lr=3e-3, temperature=0.2,
                           progress=False)
    assert len(history.loss) == 4 and history.loss[-1] < history.loss[0] - 0.2
    assert all(p > 0 for p in history.pairs_per_s) and history.lr[-1] < history.lr[0]


def test_interrupt_and_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_world, tmp_path):
    kwargs = dict(epochs=2, batch_size=128, temperature=0.2, progress=False, seed=3)
    straight = _tiny_model()
    train_simclr(straight, tiny_world, checkpoint=tmp_path / "a.pt", **kwargs)

    def interrupt(epoch, history):
        if epoch == 1:
            raise KeyboardInterrupt

    interrupted = _tiny_model()
    with pytest.raises(KeyboardInterrupt):
        train_simclr(interrupted, tiny_world, checkpoint=tmp_path / "b.pt", callback=interrupt, **kwargs)
    torch.manual_seed(123)  # different initial weights: only the checkpoint can make them equal
    resumed = SimCLRModel(resnet(10, 8), proj_dim=16)
    epochs_run = []
    history = train_simclr(resumed, tiny_world, checkpoint=tmp_path / "b.pt", resume=True,
                           callback=lambda epoch, h: epochs_run.append(epoch), **kwargs)
    assert epochs_run == [2] and history.epoch == [1, 2]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_resume_refuses_a_checkpoint_of_another_run(tiny_world, tmp_path):
    kwargs = dict(batch_size=128, temperature=0.2, progress=False, checkpoint=tmp_path / "c.pt")
    train_simclr(_tiny_model(), tiny_world, epochs=1, **kwargs)
    with pytest.raises(ValueError, match="different run"):
        train_simclr(_tiny_model(), tiny_world, epochs=1, resume=True, seed=9, **kwargs)


def test_train_simclr_explains_bad_data():
    with pytest.raises(ValueError, match="images uint8"):
        train_simclr(_tiny_model(), [torch.zeros(3, 32, 32)], epochs=1)
    with pytest.raises(ValueError, match="batch_size"):
        train_simclr(_tiny_model(), ShapesWorld(n=32, seed=0), epochs=1, batch_size=64, progress=False)


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 4
    y = torch.arange(n) % 4
    return centres[y] + torch.randn(n, 16, generator=g), y


def test_linear_probe_separates_separable_features_and_its_classifier_takes_raw_h():
    (H_train, y_train), (H_test, y_test) = _blobs(400, 1), _blobs(200, 2)
    result = linear_probe(H_train * 10 + 5, y_train, H_test * 10 + 5, y_test)
    assert result.accuracy > 0.97 and result.train_accuracy > 0.97
    assert torch.equal(result.classifier(H_test * 10 + 5).argmax(1), result.predictions)


def test_knn_accuracy_matches_a_brute_force_vote():
    (H_train, y_train), (H_test, y_test) = _blobs(60, 1), _blobs(30, 2)
    H_test[:10] = torch.randn(10, 16)  # some hard cases
    k, temperature = 5, 0.1
    sims = F.normalize(H_test, dim=1) @ F.normalize(H_train, dim=1).T
    expected = 0
    for i in range(len(H_test)):
        top = sims[i].topk(k)
        votes = torch.zeros(4)
        for s, j in zip(top.values, top.indices):
            votes[y_train[j]] += torch.exp(s / temperature)
        expected += int(votes.argmax() == y_test[i])
    assert knn_accuracy(H_train, y_train, H_test, y_test, k=k, temperature=temperature) == expected / len(H_test)


def test_probe_and_knn_reject_empty_or_nan_features():
    H, y = _blobs(20, 0)
    with pytest.raises(ValueError, match="empty"):
        linear_probe(H[:0], y[:0], H, y)
    with pytest.raises(ValueError, match="NaN"):
        knn_accuracy(H, y, H * float("nan"), y)


def test_extract_features_gives_one_row_per_image(tiny_world):
    encoder = resnet(10, 8)
    H, y = extract_features(encoder, tiny_world, batch_size=100, progress=False)
    assert H.shape == (512, encoder.out_dim) and H.dtype == torch.float32 and torch.equal(y, tiny_world.labels)


def _colour_classes(n: int, seed: int) -> ImageTensorDataset:
    """Four classes told apart only by the image's tint: an easy supervised task."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    tints = torch.tensor([[0.8, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.2, 0.8], [0.8, 0.8, 0.2]])
    images = tints[labels][:, :, None, None] + 0.1 * torch.randn(n, 3, 32, 32, generator=g)
    images = (images.clamp(0, 1) * 255).to(torch.uint8)
    return ImageTensorDataset(images, labels, ["red", "green", "blue", "yellow"], name="tints", split=str(seed), source="test")


def test_supervised_reference_learns_an_easy_task_and_scores_held_out_labels():
    torch.manual_seed(0)
    train, test = _colour_classes(512, 0), _colour_classes(256, 1)
    assert supervised_accuracy(resnet(10, 8), train, test, epochs=3, batch_size=64, device="cpu") > 0.95
    shuffled = ImageTensorDataset(test.images, test.labels[torch.randperm(256)], test.classes, name="tints",
                                  split="shuffled", source="test")
    torch.manual_seed(0)
    assert supervised_accuracy(resnet(10, 8), train, shuffled, epochs=3, batch_size=64, device="cpu") < 0.5


def test_kth_neighbour_distance_equals_a_brute_force_sort():
    from course_utils.simclr import kth_neighbour_distance

    g = torch.Generator().manual_seed(0)
    reference, query = torch.randn(50, 8, generator=g), torch.randn(7, 8, generator=g)
    cos = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(reference, dim=1).T
    expected = 1 - cos.sort(1, descending=True).values[:, 2]
    torch.testing.assert_close(kth_neighbour_distance(reference, query, k=3, chunk=3), expected)
    itself = kth_neighbour_distance(reference, reference, k=1, exclude_self=True)
    own = torch.nn.functional.normalize(reference, dim=1)
    sims = own @ own.T
    sims.fill_diagonal_(-2)
    torch.testing.assert_close(itself, 1 - sims.max(1).values, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="reference samples"):
        kth_neighbour_distance(reference, query, k=50, exclude_self=True)


def test_a_penalty_on_h_is_added_to_the_loss_and_shapes_the_representation(tiny_world):
    shapes = []

    def shrink(h: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(h.shape))
        return 10.0 * h.pow(2).sum(1).mean()

    kwargs = dict(epochs=1, batch_size=32, lr=3e-3, temperature=0.2, progress=False, device="cpu", seed=0)
    plain, penalised = _tiny_model(), _tiny_model()
    plain_history = train_simclr(plain, tiny_world, **kwargs)
    penalised_history = train_simclr(penalised, tiny_world, penalty=shrink, **kwargs)
    assert shapes and all(s == (64, plain.encoder.out_dim) for s in shapes)  # both views of each batch
    assert penalised_history.loss[0] > plain_history.loss[0]  # the loss includes the penalty
    x = tiny_world.images[:64].float() / 255
    with torch.no_grad():
        assert penalised.encoder(x).norm(dim=1).mean() < plain.encoder(x).norm(dim=1).mean()


def test_random_linear_head_is_gaussian_weights_on_standardised_features_and_seeded():
    generator = torch.Generator().manual_seed(0)
    H = torch.rand(50, 6, generator=generator) * torch.tensor([1.0, 2, 3, 4, 5, 6]) + 7
    head = random_linear_head(H, 4, seed=3)
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    standardised = (H.double() - H.double().mean(0)) / H.double().std(0)
    torch.testing.assert_close(head(H).double(), standardised @ weight.T, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(head(H).mean(0), torch.zeros(4), rtol=0, atol=1e-4)  # centred on the data
    torch.testing.assert_close(random_linear_head(H, 4, seed=3).weight, head.weight)
    assert not torch.allclose(random_linear_head(H, 4, seed=4).weight, head.weight)
    with pytest.raises(ValueError, match="features"):
        random_linear_head(H[0], 4)
    with pytest.raises(ValueError, match="n_classes"):
        random_linear_head(H, 0)
