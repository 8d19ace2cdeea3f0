"""unlearningexample: the user's own model, data and training loop (no fedunlearn here)."""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


class Net(nn.Module):
    """A small CNN for 8x8 grey digits."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class Digits(Dataset):
    def __init__(self, x, y):
        self.x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        self.targets = np.asarray(y, dtype=np.int64)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.x[i], int(self.targets[i])


def load_data(partition_id: int, num_partitions: int):
    """This partition's train and validation sets (scikit-learn's digits, IID)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(42).permutation(len(y))[: len(y) - 360]
    part = np.array_split(order, num_partitions)[partition_id]
    cut = int(0.8 * len(part))
    return Digits(x[part[:cut]], y[part[:cut]]), Digits(x[part[cut:]], y[part[cut:]])


def load_test():
    """The server's own held-out test set (the last 360 digits of the shuffle)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(42).permutation(len(y))[len(y) - 360:]
    return Digits(x[order], y[order])


def train(net, trainloader, epochs, lr, device):
    net.to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running = 0.0
    for _ in range(epochs):
        for x, y in trainloader:
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            running += loss.item()
    return running / max(1, len(trainloader) * epochs)


def test(net, testloader, device):
    net.to(device)
    net.eval()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for x, y in testloader:
            out = net(x.to(device))
            loss += F.cross_entropy(out, y.to(device), reduction="sum").item()
            correct += (out.argmax(1) == y.to(device)).sum().item()
    n = len(testloader.dataset)
    return loss / n, correct / n
