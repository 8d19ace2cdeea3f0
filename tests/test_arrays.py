"""The fast Array conversions are Flower's own, byte for byte and value for value, and a
node that reuses its models between messages answers exactly as one that builds them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedunlearn.arrays import (DecodedArray, copy_record, decoded, from_numpy,
                               record_from_state, state_dict, to_numpy)
from fedunlearn.client.actions import handle_action
from fedunlearn.harness.models import create_model
from fedunlearn.training import to_arrays
from fedunlearn.harness.node import harness_view
from tests.helpers import RC, context, train_msg

CASES = [np.arange(12, dtype=np.float32).reshape(3, 4), np.array(3.5),
         np.zeros(0, dtype=np.float32), np.arange(5, dtype=np.int64),
         np.array([True, False]), np.arange(6, dtype=np.uint8).reshape(2, 3),
         np.ones((2, 2), dtype=np.float16), np.array([1 + 2j], dtype=np.complex64),
         np.arange(4, dtype=">f4"), np.random.default_rng(0).normal(size=(7, 1, 3, 3))]


@pytest.mark.parametrize("nd", CASES, ids=lambda a: f"{a.dtype.str}{list(a.shape)}")
def test_encoding_and_decoding_are_flowers_own(nd):
    ours, flowers = from_numpy(nd), Array(nd)
    again = from_numpy(nd)  # the second time uses the remembered header
    for got in (ours, again):
        assert (got.dtype, got.shape, got.stype, got.data) == \
            (flowers.dtype, flowers.shape, flowers.stype, flowers.data)
    back = to_numpy(flowers)
    want = flowers.numpy()
    assert back.dtype == want.dtype and back.shape == want.shape
    np.testing.assert_array_equal(back, want)
    assert back.flags.writeable
    back[...] = 0  # a copy: the Array is untouched
    np.testing.assert_array_equal(flowers.numpy(), want)
    assert not to_numpy(flowers, writable=False).flags.writeable or nd.size == 0


def test_non_contiguous_and_fortran_arrays_go_through_flower():
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    for nd in (base.T, np.asfortranarray(base), base[:, ::2]):
        assert from_numpy(nd).data == Array(nd).data
        np.testing.assert_array_equal(to_numpy(Array(nd)), nd)


def test_a_corrupt_buffer_fails_as_flowers_decoding_does():
    good = Array(np.arange(10, dtype=np.float32))
    for data in (good.data[:-4], good.data[:20], b"not numpy", good.data + b"\x00" * 4):
        bad = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=data)
        try:
            expected = bad.numpy()
        except Exception as err:  # noqa: BLE001 - whatever np.load raises, we raise
            with pytest.raises(type(err)):
                to_numpy(bad)
        else:
            np.testing.assert_array_equal(to_numpy(bad), expected)


def test_state_dicts_and_records_round_trip():
    model = create_model("cnn", num_classes=10, in_channels=1, image_size=8)
    record = record_from_state(model.state_dict())
    assert [a.data for a in record.values()] == \
        [a.data for a in ArrayRecord(model.state_dict()).values()]
    loaded = state_dict(record)
    assert list(loaded) == list(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value)
    copied = copy_record(record)
    assert list(copied) == list(record)
    assert all(copied[k] is not record[k] and copied[k].data is record[k].data for k in record)
    same = decoded(record)
    assert same is record and all(type(a) is DecodedArray for a in record.values())
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(record[key].numpy(), value.numpy())


def _train_reply(node: int, arrays: ArrayRecord) -> list[bytes]:
    msg = train_msg({"arrays": arrays}, {}, "train")
    reply = handle_action("default", msg, context(node, RC), harness_view)
    return [a.data for a in reply.content["arrays"].values()]


def test_a_node_reusing_its_model_answers_as_with_a_fresh_one(monkeypatch):
    from fedunlearn.client import actions

    torch.manual_seed(0)
    first = to_arrays(create_model("cnn", num_classes=10, in_channels=1, image_size=8))
    torch.manual_seed(1)
    second = to_arrays(create_model("cnn", num_classes=10, in_channels=1, image_size=8))
    reused = [_train_reply(0, first), _train_reply(1, second), _train_reply(0, second)]
    # A model left frozen, in eval mode and with gradients by someone else is reset.
    for model in actions._SPARE_MODELS.values():
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = torch.ones_like(p)
    reused.append(_train_reply(1, first))
    monkeypatch.setattr(actions, "_REUSING", set())  # every message builds its models
    fresh = [_train_reply(0, first), _train_reply(1, second), _train_reply(0, second),
             _train_reply(1, first)]
    assert reused == fresh
    assert reused[0] != reused[2]  # the replies depend on the model sent
