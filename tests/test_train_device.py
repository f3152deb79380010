"""The trainer hands the model its pack on the accelerator's device (the model never moves its inputs)."""

from __future__ import annotations

import torch

from unibrain_hf.processing.packing import PackedBatch

from helpers import tiny_model, tiny_packer, toy_samples
from train_helpers import make_config, train_workspace  # noqa: F401  (train_workspace is a fixture)


def test_packed_batch_to_moves_every_model_input_tensor():
    model = tiny_model()
    batch = tiny_packer(model.config).pack(toy_samples())
    moved = batch.to("meta")
    for name in PackedBatch.model_input_names():
        value = getattr(moved, name)
        if torch.is_tensor(value):
            assert value.device.type == "meta", name
            assert getattr(batch, name).device.type == "cpu", name  # the original is left as it was
    assert moved.sample_lens == batch.sample_lens and moved.padded_images is batch.padded_images


def test_train_step_feeds_the_model_on_the_accelerator_device(train_workspace, monkeypatch):
    from unibrain_hf.train.trainer import Trainer

    seen = []
    original = PackedBatch.to

    def spy(self, device):
        seen.append(torch.device(device))
        return original(self, device)

    monkeypatch.setattr(PackedBatch, "to", spy)
    config = make_config(train_workspace, "unified", **{"train.max_steps": 1, "train.save_every": 1,
                                                         "train.export_pipeline": False,
                                                         "train.output_dir": train_workspace[0] / "runs" / "device"})
    trainer = Trainer(config, progress=False)
    trainer.fit()
    assert seen and all(device == trainer.accelerator.device for device in seen)
